"""Wrapped optimizers: the real ``torch.optim.Optimizer`` inside a framework's wrapper.

Trainers hand out wrappers, not the optimizer the user built: accelerate's
``AcceleratedOptimizer`` (a ``torch.optim.Optimizer`` subclass whose ``__init__`` never ran, so
it has no step-hook tables) and Lightning's ``LightningOptimizer`` (a class made on the fly to
pass ``isinstance`` checks). Both keep the real one in ``.optimizer``. Step hooks and the
per-parameter state belong to that real optimizer, so everything the Governor installs or
captures goes there, and two optimizers "match" when they unwrap to the same object.

A wrapper that keeps state of its own beside its ``.optimizer`` (a Lookahead-style optimizer) is
unwrapped too: only the inner optimizer's state is captured and restored.
"""

from __future__ import annotations

import torch

_WRAPPER_EXAMPLES = "accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer"


def optimizer_chain(optimizer: object) -> list[object]:
    """``optimizer`` followed by every object reached through ``.optimizer`` while that
    attribute is a ``torch.optim.Optimizer`` (cycles stop the walk). The last entry is the real
    optimizer when ``optimizer`` is one or wraps one; nothing is validated here."""
    chain = [optimizer]
    seen = {id(optimizer)}
    while True:
        inner = getattr(chain[-1], "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or id(inner) in seen:
            return chain
        chain.append(inner)
        seen.add(id(inner))


def unwrap_optimizer(optimizer: object, *, name: str = "optimizer") -> torch.optim.Optimizer | None:
    """The real optimizer inside ``optimizer`` (itself when it wraps nothing); None for None.

    Raises:
        TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor an object whose
            ``.optimizer`` chain ends in one (the message names ``name`` and the type).
    """
    if optimizer is None:
        return None
    real = optimizer_chain(optimizer)[-1]
    if not isinstance(real, torch.optim.Optimizer):
        raise TypeError(
            f"{name} must be a torch.optim.Optimizer or None (or a wrapper whose .optimizer is one: "
            f"{_WRAPPER_EXAMPLES}), got {type(optimizer).__name__}"
        )
    return real


def same_optimizer(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` unwrap to the same real optimizer (None matches only None).
    Raises the TypeError of :func:`unwrap_optimizer` for a non-optimizer."""
    return unwrap_optimizer(a) is unwrap_optimizer(b)


__all__ = ["optimizer_chain", "same_optimizer", "unwrap_optimizer"]
