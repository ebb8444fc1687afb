"""The tensors a Governor's health check reads, listed once per model structure.

``check_health()`` and ``observe()`` inspect the model's parameters, then the gradients that
exist. Listing them with ``model.named_parameters()`` walks every module and builds every name
on every step (about 10 ms for 2,500 small layers); :class:`CheckedTensors` lists them once and
lists them again only when :class:`tolaria.health.structure.ModuleTree` says the tree changed
(a parameter replaced, a module added or removed, ...). Gradients are read from the parameters
at every call (``p.grad`` changes every step), in one C loop (``tolaria._C.gradients``) when the
extension is loaded, else in C-level passes. A call hands back a :class:`Listing`: the names and
the tensors as two parallel sequences, the names cached with the structure, so a step builds no
``(name, tensor)`` pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, is_
from typing import NamedTuple

import torch
from torch import nn

from tolaria import _ext
from tolaria.health.structure import ModuleTree

_grad = attrgetter("grad")
_version = attrgetter("_version")
Pairs = list[tuple[str, torch.Tensor]]


class Listing(NamedTuple):
    """What one health check reads: ``tensors[i]`` named ``names[i]``, the first ``n_params`` of
    them parameters, the rest gradients. The sequences may be shared with the cache: read only."""

    names: Sequence[str]
    tensors: Sequence[torch.Tensor]
    n_params: int

    def pairs(self) -> Pairs:
        return list(zip(self.names, self.tensors, strict=True))


def gradients_in_python(params: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[int] | None]:
    """The pure-Python twin of ``tolaria._C.gradients``: the ``.grad`` of each parameter that has
    one, in order, and their indices (None when every parameter has one)."""
    grads = tuple(map(_grad, params))
    missing = list(map(is_, grads, repeat(None)))
    if not any(missing):
        return list(grads), None
    present = [index for index, absent in enumerate(missing) if not absent]
    return [grads[index] for index in present], present


_compiled_gradients = _ext.compiled("gradients")  # None: the twin serves


def gradients(params: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[int] | None]:
    """See :func:`gradients_in_python`; one C loop when the extension is loaded."""
    if _compiled_gradients is not None:
        return _compiled_gradients(params)  # type: ignore[no-any-return]
    return gradients_in_python(params)


@dataclass(frozen=True)
class GradientNorms:
    """Per-tensor L2 norms of some gradients, computed by someone who had to read them anyway
    (:func:`tolaria.clip_grad_norm_`): ``norms[i]`` (a 0-dim tensor on the gradient's device) is
    the norm of ``grads[i]``, the ``.grad`` of ``params[i]`` when it was computed;
    ``versions[i]`` is that gradient's ``_version`` once its owner was done with it (after the
    clip scaled it in place).

    A health check given these reads each norm instead of its gradient: a non-finite gradient
    has a non-finite norm, and the global gradient norm is the root of their squares. A norm
    is used only while its parameter's ``.grad`` is still that very tensor, unwritten since
    (a gradient zeroed in place and accumulated again has a new version: it is read)."""

    params: tuple[torch.Tensor, ...]
    grads: tuple[torch.Tensor, ...]
    norms: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]

    def substitute(self, params: Sequence[torch.Tensor], grads: tuple[torch.Tensor | None, ...]
                   ) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
        """``grads`` (of ``params``) with each gradient this knows replaced by its norm."""
        if tuple(map(_version, self.grads)) != self.versions:
            return grads  # written since: the norms are stale (rare; read everything)
        if len(params) == len(self.params) and all(map(is_, params, self.params)):
            if all(map(is_, grads, self.grads)):  # the usual case: clip_grad_norm_(model.parameters())
                return self.norms
        known = {id(p): (g, n) for p, g, n in zip(self.params, self.grads, self.norms, strict=True)}
        out = list(grads)
        for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
            entry = known.get(id(param))
            if entry is not None and grad is entry[0]:
                out[index] = entry[1]
        return tuple(out)


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
    """The :class:`Listing` of one model's parameters and gradients (see the module docstring).
    ``rebuilds`` counts the listings of the model (for tests)."""

    def __init__(self) -> None:
        self._tree: ModuleTree | None = None
        self._params: tuple[torch.Tensor, ...] = ()
        self._param_names: tuple[str, ...] = ()
        self._grad_names: tuple[str, ...] = ()
        self._all_names: tuple[str, ...] = ()
        self.rebuilds = 0

    def _refresh(self, model: nn.Module) -> None:
        tree = self._tree
        if tree is not None and tree.unchanged(model):
            return
        tree = ModuleTree(model, parameters_only=True)
        named = list(model.named_parameters())
        self._params = tuple(p for _, p in named)
        self._param_names = tuple(name for name, _ in named)
        self._grad_names = tuple(f"{name}.grad" for name, _ in named)
        self._all_names = self._param_names + self._grad_names
        self._tree = tree if _plain_listing(model, tree) else None
        self.rebuilds += 1

    def listing(
        self, model: nn.Module, *, parameters: bool, gradients: bool, known: GradientNorms | None = None
    ) -> Listing:
        """The parameters (when ``parameters``), then the gradients that exist (when
        ``gradients``), named ``<parameter>.grad`` (their norms instead where ``known`` has
        them)."""
        self._refresh(model)
        params = self._params if parameters else ()
        param_names = self._param_names if parameters else ()
        n_params = len(params)
        if not gradients:
            return Listing(param_names, params, n_params)
        if known is not None:  # tolaria.clip_grad_norm_ measured them: its norms stand in
            grads = known.substitute(self._params, tuple(map(_grad, self._params)))
            kept = [(n, g) for n, g in zip(self._grad_names, grads, strict=True) if g is not None]
            return Listing([*param_names, *(n for n, _ in kept)], [*params, *(g for _, g in kept)], n_params)
        found, present = _gradients(self._params)
        if present is None:  # every parameter has a gradient: the names are the cached ones
            return Listing(self._all_names if parameters else self._grad_names, [*params, *found], n_params)
        grad_names = [self._grad_names[index] for index in present]
        return Listing([*param_names, *grad_names], [*params, *found], n_params)

    def names(self, model: nn.Module, *, parameters: bool, gradients: bool) -> list[str]:
        """Every name :meth:`listing` may report, gradients or not (the same list on every rank)."""
        self._refresh(model)
        params = list(self._param_names) if parameters else []
        return params + (list(self._grad_names) if gradients else [])


_gradients = gradients  # CheckedTensors.listing's keyword argument shadows the function's name


__all__ = ["CheckedTensors", "GradientNorms", "Listing", "gradients", "gradients_in_python"]
