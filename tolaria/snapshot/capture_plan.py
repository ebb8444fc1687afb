"""What a snapshot captures, derived once and kept until the model or optimizer changes.

:func:`tolaria.snapshot.entries.capture_contents` walks ``model.state_dict()`` and the optimizer
state on every call: most of a 5,000-tensor snapshot's host time. :class:`CapturePlans` keeps
what it derived (the entries, the seed exclusions, the extra-state modules, the optimizer's
:class:`OptimizerSnapshot`) and re-derives it only when something it rests on changed, tested
exactly each time:

* the model tree (:class:`tolaria.health.structure.ModuleTree`: parameters, buffers and modules
  registered, replaced or removed; ``load_state_dict(assign=True)``);
* the seed slots' stages (germinated, fossilized, pruned: the exclusions follow them);
* the optimizer: its param groups (added, their parameter lists), each parameter's state dict
  (created on the first step, replaced) and every value in it (a state tensor replaced, a key
  added).

Extra state (``get_extra_state``) is read and deep-copied at every capture, as the full walk does.
A model whose ``state_dict()`` is not plain (a module overrides how it saves itself, a state-dict
hook, a sharded DTensor), or an optimizer state holding a mutable non-tensor value, takes the
full walk every time: correct first. Shapes, dtypes, devices and storages are the stores' to
check at every capture (they read every tensor's address anyway).
"""

from __future__ import annotations

import copy
from itertools import chain
from operator import is_, itemgetter

import torch
from torch import nn

from tolaria.health.kinds import local_tensor
from tolaria.health.structure import ModuleTree
from tolaria.snapshot.entries import CaptureContents, CaptureMeta, LiveEntries, model_entries
from tolaria.snapshot.optimizer_state import OptimizerSnapshot, optimizer_entries
from tolaria.snapshot.seeds import _seed_slots, is_fossilized

_EXTRA_STATE = "_extra_state"
# Values that a state dict may hold by identity: equal identity means equal value, for ever.
_IMMUTABLE = (type(None), bool, int, float, complex, str)
_params_of = itemgetter("params")


def _seed_stages(model: nn.Module) -> tuple[tuple[object, object, bool], ...]:
    return tuple((slot_id, slot, is_fossilized(slot)) for slot_id, slot in _seed_slots(model))


class ModelPlan:
    """The model half of a capture: its live tensors, extra-state modules and excluded keys."""

    def __init__(self, model: nn.Module, tree: ModuleTree) -> None:
        self.tree = tree
        self.seeds = _seed_stages(model)
        tensors, extras, excluded = model_entries(model)
        self.tensors = tensors
        self.excluded = excluded
        self.walked_extras = extras
        self.extra_modules = tuple(
            (key, model.get_submodule(key[: -len(_EXTRA_STATE)].rstrip("."))) for key in extras
        )
        self.keys = tuple(key for key, _ in tensors) + tuple(extras)
        # A DTensor's local shard is a new object per to_local(): nothing to keep.
        self.cacheable = tree.plain_state_dict() and all(
            local_tensor(t) is t for t in tree._values if isinstance(t, torch.Tensor)
        )

    def holds(self, model: nn.Module) -> bool:
        return self.tree.unchanged(model) and _seed_stages(model) == self.seeds

    def extras(self) -> dict[str, object]:
        return {key: module.get_extra_state() for key, module in self.extra_modules}


class OptimizerPlan:
    """The optimizer half: its state entries and :class:`OptimizerSnapshot`, and what they rest on."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.entries, snapshot = optimizer_entries(optimizer)
        assert snapshot is not None
        self.snapshot: OptimizerSnapshot = snapshot
        self._read(optimizer)
        self.cacheable = all(
            isinstance(v, _IMMUTABLE) or (isinstance(v, torch.Tensor) and local_tensor(v) is v)
            for v in self._values
        )

    def _read(self, optimizer: torch.optim.Optimizer) -> None:
        self._groups = tuple(optimizer.param_groups)
        self._lists = tuple(map(_params_of, self._groups))
        self._params = tuple(chain.from_iterable(self._lists))
        state = optimizer.state
        self._state_keys, self._state_values = tuple(state), tuple(state.values())
        # Every state dict the parameters have, empty ones too: a dict created empty (any read of
        # the defaultdict) and filled in place later (Adam's first step) must show up as new keys.
        self._present = tuple(d for d in map(state.get, self._params) if d is not None)
        self._keys = list(chain.from_iterable(self._present))
        self._values = tuple(chain.from_iterable(map(dict.values, self._present)))

    def holds(self, optimizer: torch.optim.Optimizer) -> bool:
        if optimizer is not self.optimizer:
            return False
        groups = optimizer.param_groups
        if len(groups) != len(self._groups) or not all(map(is_, groups, self._groups)):
            return False
        lists = tuple(map(_params_of, groups))
        if not all(map(is_, lists, self._lists)):
            return False
        params = tuple(chain.from_iterable(lists))
        if len(params) != len(self._params) or not all(map(is_, params, self._params)):
            return False
        # The state mapping as it iterates: the very keys and values, in order, so every parameter
        # still maps to the same state dict. Not looked up per parameter: Tensor.__hash__ is Python
        # code, about a third of a 292-parameter check of this plan.
        state = optimizer.state
        if len(state) != len(self._state_keys) or not all(map(is_, state, self._state_keys)):
            return False
        if not all(map(is_, state.values(), self._state_values)):
            return False
        present = self._present
        if list(chain.from_iterable(present)) != self._keys:
            return False
        values = tuple(chain.from_iterable(map(dict.values, present)))
        return len(values) == len(self._values) and all(map(is_, values, self._values))


class CapturePlans:
    """The capture plan of one Governor: :meth:`contents` is :func:`capture_contents` without
    the walk while nothing changed. ``rebuilds`` counts the derivations (for tests)."""

    def __init__(self) -> None:
        self._model: ModelPlan | None = None
        self._optimizer: OptimizerPlan | None = None
        self._entries: dict[str, torch.Tensor] | None = None
        self.rebuilds = 0

    def live_entries(self, model: nn.Module) -> LiveEntries | None:
        """The model's entries as :func:`model_entries` would walk them, from the kept plan when
        it still holds exactly (a rollback's restore and drift check need no walk then); None
        when there is no plan or something changed (the caller walks)."""
        plan = self._model
        if plan is None or not plan.holds(model):
            return None
        return list(plan.tensors), plan.walked_extras, plan.excluded

    def contents(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> CaptureContents:
        fresh_extras: dict[str, object] | None = None
        model_plan = self._model
        if model_plan is None or not model_plan.holds(model):
            model_plan = ModelPlan(model, ModuleTree(model))
            fresh_extras = model_plan.walked_extras  # this walk's own reading: use it
            self._model, self._entries = (model_plan if model_plan.cacheable else None), None
            self.rebuilds += 1
        opt_plan = self._optimizer
        if optimizer is None:
            opt_plan = self._optimizer = None
        elif opt_plan is None or not opt_plan.holds(optimizer):
            opt_plan = OptimizerPlan(optimizer)  # a fresh reading: right for this capture either way
            self._optimizer, self._entries = (opt_plan if opt_plan.cacheable else None), None
            self.rebuilds += 1
        entries = self._entries
        if entries is None:
            # One mapping, reused while nothing changes: a store reads its keys and values in two
            # C-level passes. The optimizer's keys start with "@", never a state-dict key.
            opt_entries = opt_plan.entries if opt_plan is not None else []
            entries = dict(chain(model_plan.tensors, opt_entries))
            if self._model is not None and (optimizer is None or self._optimizer is not None):
                self._entries = entries
        extras = fresh_extras if fresh_extras is not None else model_plan.extras()
        meta = CaptureMeta(
            model_plan.keys, copy.deepcopy(extras), opt_plan.snapshot if opt_plan is not None else None
        )
        return CaptureContents(entries, meta, model_plan.excluded)  # type: ignore[arg-type]


__all__ = ["CapturePlans", "ModelPlan", "OptimizerPlan"]
