"""Mixed precision with a ``torch.amp.GradScaler``: gradients in true units, and overflows.

A scaler multiplies the loss by its scale before backward, so the gradients are ``scale`` times
too large until ``scaler.unscale_(optimizer)`` divides them back; an overflow (a non-finite
gradient) makes ``scaler.step`` skip the optimizer step and ``scaler.update`` lower the scale.
The Governor must judge gradients in true units (its gradient-norm history would otherwise jump
with every change of the scale) and must not mistake such an overflow for a sick model.

Two situations, told apart by the scaler's per-optimizer stage:

* **already unscaled** (``GuardedStep`` unscales itself, Lightning's precision plugin unscales
  before ``on_before_optimizer_step``, HF's Trainer before ``on_pre_optimizer_step``): the
  gradients are in true units and the scaler has recorded whether it found an overflow;
* **not yet unscaled** (accelerate and HF's Trainer unscale later, inside
  ``clip_grad_norm_``, which raises if ``unscale_`` ran before): :func:`true_units` divides the
  gradients in place for the duration of the check, with the scaler's own fused kernel, and
  multiplies them back afterwards. With the scaler's power-of-two scales both multiplications
  are exact for every gradient whose unscaled value is a normal float (fp32: above 1.2e-38), so
  the trainer's own unscale later sees the bits it would have seen.

torch keeps the stage in ``GradScaler._per_optimizer_states`` with no public accessor; this
module is the one place that reads it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from tolaria.optim import optimizer_chain, unwrap_optimizer


def check_scaler(scaler: object) -> torch.amp.GradScaler | None:
    """``scaler`` itself, or None for None or a disabled scaler (``enabled=False``: it scales
    nothing). Raises TypeError naming the type unless it is a ``torch.amp.GradScaler``."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None


def _unscaled_state(scaler: torch.amp.GradScaler, optimizer: object) -> dict[str, Any] | None:
    """The scaler's record for ``optimizer`` when it was unscaled since the last update (the
    trainer may have keyed it by the wrapper or by the real optimizer), else None."""
    states = scaler._per_optimizer_states
    for candidate in optimizer_chain(optimizer):
        state = states.get(id(candidate))  # .get: a lookup must not add a record (a defaultdict)
        if state is not None and state["stage"] is OptState.UNSCALED:
            return state
    return None


def is_unscaled(scaler: torch.amp.GradScaler, optimizer: object) -> bool:
    """Whether ``scaler.unscale_`` ran for ``optimizer`` (or the optimizer it wraps) since the
    scaler's last ``update()``."""
    return _unscaled_state(scaler, optimizer) is not None


def _grads_by_device_and_dtype(optimizer: torch.optim.Optimizer) -> dict[Any, list[torch.Tensor]]:
    groups: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is not None and not grad.is_sparse:
                groups[(grad.device, grad.dtype)].append(grad)
    return groups


@contextmanager
def true_units(scaler: torch.amp.GradScaler | None, optimizer: object) -> Iterator[bool]:
    """Inside the block, ``optimizer``'s gradients are in true units; yields whether the scaler
    will skip this step (it found, or will find, a non-finite gradient).

    Without a scaler: nothing changes, yields False. Already unscaled: yields the overflow the
    scaler recorded. Not yet unscaled: divides the gradients in place now and multiplies them back
    when the block ends (see the module docstring); the scaler's state is not touched.
    """
    if scaler is None:
        yield False
        return
    state = _unscaled_state(scaler, optimizer)
    if state is not None:
        yield any(bool(found.item()) for found in state["found_inf_per_device"].values())
        return
    real = unwrap_optimizer(optimizer)
    assert real is not None
    scale = scaler.get_scale()
    groups = _grads_by_device_and_dtype(real)
    found_infs = []
    for (device, _dtype), grads in groups.items():
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        inverse = torch.full((1,), 1.0 / scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse)
        found_infs.append(found_inf)
    try:
        yield any(bool(found.item()) for found in found_infs)
    finally:
        for grads in groups.values():
            torch._foreach_mul_(grads, scale)


def mark_overflow(optimizer: object) -> None:
    """Leave one Inf gradient on ``optimizer``'s smallest parameter, so that a scaler which has not
    unscaled yet finds an overflow and skips the step: after a rollback cleared the gradients, a
    scaler with no gradient at all raises "No inf checks were recorded for this optimizer"."""
    real = unwrap_optimizer(optimizer)
    assert real is not None
    params = [p for group in real.param_groups for p in group["params"] if p.requires_grad]
    if params:
        smallest = min(params, key=lambda p: p.numel())
        smallest.grad = torch.full_like(smallest, math.inf)


__all__ = ["check_scaler", "is_unscaled", "mark_overflow", "true_units"]
