"""The tensors a Governor's health check reads, listed once per model structure.

``check_health()`` and ``observe()`` inspect the model's parameters, then the gradients that
exist. Listing them with ``model.named_parameters()`` walks every module and builds every name
on every step (about 10 ms for 2,500 small layers); :class:`CheckedTensors` lists them once and
lists them again only when :class:`tolaria.health.structure.ModuleTree` says the tree changed
(a parameter replaced, a module added or removed, ...). Gradients are read from the parameters
at every call (``p.grad`` changes every step), in C-level passes.
"""

from __future__ import annotations

from itertools import compress, repeat
from operator import attrgetter, is_not

import torch
from torch import nn

from tolaria.health.structure import ModuleTree

_grad = attrgetter("grad")
Pairs = list[tuple[str, torch.Tensor]]


def _plain_listing(model: nn.Module, tree: ModuleTree) -> bool:
    """Whether ``named_parameters()`` is what the modules' dicts say (no override of how a module
    lists its members; else every call lists afresh, to stay exact)."""
    base = nn.Module
    if type(model).named_parameters is not base.named_parameters:
        return False
    if type(model)._named_members is not base._named_members:
        return False
    return all(type(m).named_modules is base.named_modules for m in tree.modules)


class CheckedTensors:
    """``(name, tensor)`` lists of one model's parameters and gradients (see the module docstring).
    ``rebuilds`` counts the listings (for tests)."""

    def __init__(self) -> None:
        self._tree: ModuleTree | None = None
        self._named: Pairs = []
        self._params: tuple[torch.Tensor, ...] = ()
        self._grad_names: tuple[str, ...] = ()
        self.rebuilds = 0

    def _refresh(self, model: nn.Module) -> None:
        tree = self._tree
        if tree is not None and tree.unchanged(model):
            return
        tree = ModuleTree(model)
        self._named = list(model.named_parameters())
        self._params = tuple(p for _, p in self._named)
        self._grad_names = tuple(f"{name}.grad" for name, _ in self._named)
        self._tree = tree if _plain_listing(model, tree) else None
        self.rebuilds += 1

    def pairs(self, model: nn.Module, *, parameters: bool, gradients: bool) -> tuple[Pairs, int]:
        """The parameters (when ``parameters``), then the gradients that exist (when
        ``gradients``), named ``<parameter>.grad``; and how many of them are parameters."""
        self._refresh(model)
        pairs: Pairs = list(self._named) if parameters else []
        n_params = len(pairs)
        if gradients:
            grads = tuple(map(_grad, self._params))
            pairs += compress(zip(self._grad_names, grads, strict=True), map(is_not, grads, repeat(None)))
        return pairs, n_params

    def names(self, model: nn.Module, *, parameters: bool, gradients: bool) -> list[str]:
        """Every name :meth:`pairs` may report, gradients or not (the same list on every rank)."""
        self._refresh(model)
        params = [name for name, _ in self._named] if parameters else []
        return params + (list(self._grad_names) if gradients else [])


__all__ = ["CheckedTensors"]
