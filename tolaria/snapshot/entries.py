"""What a Governor snapshot holds, and how it goes back: model and optimizer entries.

A snapshot is more than ``model.state_dict()``:

* the experimental parts of a morphogenetic model are left out (:mod:`tolaria.snapshot.seeds`
  says which), because a rollback prunes those seeds instead of restoring them;
* non-tensor module extra state travels beside the tensors (deep-copied, by key);
* the optimizer's per-parameter state is captured as store entries together with the weights,
  so both commit atomically: zeroed Adam moments with a kept step count would make the next
  updates about 3x too large.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tolaria.snapshot.seeds import excluded_seed_keys
from tolaria.snapshot.store import SnapshotStore

#: Keys of optimizer-state tensors in a store; ``@`` never starts a state-dict key.
OPTIMIZER_KEY_PREFIX = "@optimizer/"
_EXTRA_STATE = "_extra_state"


def state_dict_entries(
    model: nn.Module, excluded: Callable[[str], bool]
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]:
    """Split ``model.state_dict(keep_vars=True)`` into tensors, non-tensor entries (module extra
    state, kept by key) and the keys for which ``excluded(key)`` is true. Tensors are the live
    ones (not copies); parameters keep their identity."""
    tensors: list[tuple[str, torch.Tensor]] = []
    extras: dict[str, object] = {}
    dropped: list[str] = []
    for key, value in model.state_dict(keep_vars=True).items():
        if excluded(key):
            dropped.append(key)
        elif isinstance(value, torch.Tensor):
            tensors.append((key, value))
        else:
            extras[key] = value
    return tensors, extras, tuple(dropped)


def restore_extra_state(model: nn.Module, saved: Mapping[str, object], live_keys: Container[str]) -> None:
    """Give each module whose ``_extra_state`` key is in both ``saved`` and ``live_keys`` a deep
    copy of its saved extra state (a copy, so the LKG survives for the next rollback)."""
    for key, value in saved.items():
        if key not in live_keys or not key.endswith(_EXTRA_STATE):
            continue
        module = model.get_submodule(key[: -len(_EXTRA_STATE)].rstrip("."))
        module.set_extra_state(copy.deepcopy(value))


@dataclass(frozen=True)
class OptimizerSnapshot:
    """The shape of an optimizer's state at capture time: for each parameter (a weak reference,
    so pruned parameters are not kept alive), each state entry is either ``("tensor", key,
    device)`` — the value lives in the store under ``key`` — or ``("value", deep copy)``."""

    optimizer: weakref.ref[torch.optim.Optimizer]
    per_param: tuple[tuple[weakref.ref[torch.Tensor], dict[str, tuple[Any, ...]]], ...]


def optimizer_entries(
    optimizer: torch.optim.Optimizer | None,
) -> tuple[list[tuple[str, torch.Tensor]], OptimizerSnapshot | None]:
    """The optimizer's per-parameter state as store entries plus its :class:`OptimizerSnapshot`.
    Parameter-group hyperparameters (the learning rate, owned by schedulers) are not captured."""
    if optimizer is None:
        return [], None
    tensors: list[tuple[str, torch.Tensor]] = []
    per_param = []
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            spec: dict[str, tuple[Any, ...]] = {}
            for name, value in (optimizer.state.get(param) or {}).items():
                if isinstance(value, torch.Tensor):
                    key = f"{OPTIMIZER_KEY_PREFIX}{index}/{name}"
                    tensors.append((key, value))
                    spec[name] = ("tensor", key, value.device)
                else:
                    spec[name] = ("value", copy.deepcopy(value))
            per_param.append((weakref.ref(param), spec))
            index += 1
    return tensors, OptimizerSnapshot(weakref.ref(optimizer), tuple(per_param))


def _reusable(current: object, kept: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    if not isinstance(current, torch.Tensor):
        return None
    fits = current.shape == kept.shape and current.dtype == kept.dtype and current.device == device
    return current if fits else None


def optimizer_restore_plan(
    optimizer: torch.optim.Optimizer | None, snap: OptimizerSnapshot | None, saved: Mapping[str, torch.Tensor]
) -> tuple[list[tuple[str, torch.Tensor]], Callable[[], str]]:
    """Plan how to put ``snap`` back into ``optimizer``.

    Returns restore targets for the store (live state tensors reused in place when their shape,
    dtype and device fit, fresh ones otherwise) and a ``finish()`` to call once the store has
    written them: it installs the captured per-parameter state and returns ``"restored"``. If
    ``snap`` was not taken of this very optimizer, there are no targets and ``finish()`` clears
    the optimizer's per-parameter state entirely (``"cleared"``): stale moments with a stale step
    count make the next updates far too large. Without an optimizer: ``"untouched"``.

    Parameters are matched by identity (a rollback keeps Parameter objects), so the mapping of
    state to parameters survives; a parameter without captured state ends with no state.
    """
    if optimizer is None:
        return [], lambda: "untouched"
    if snap is None or snap.optimizer() is not optimizer:

        def clear() -> str:
            optimizer.state.clear()
            return "cleared"

        return [], clear
    captured = {id(ref()): (ref, spec) for ref, spec in snap.per_param if ref() is not None}
    targets: list[tuple[str, torch.Tensor]] = []
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        group_params: list[torch.Tensor] = group["params"]
        for param in group_params:
            param_ref, spec = captured.get(id(param), (None, {}))
            if param_ref is None or param_ref() is not param:
                new_state[param] = {}
                continue
            live = optimizer.state.get(param) or {}
            state: dict[str, Any] = {}
            for name, entry in spec.items():
                if entry[0] != "tensor":
                    state[name] = copy.deepcopy(entry[1])
                    continue
                key, device = entry[1], entry[2]
                kept = saved[key]
                # Reuse a fitting live tensor, so whatever else holds it sees the restored values.
                target = _reusable(live.get(name), kept, device)
                if target is None:
                    target = torch.empty(kept.shape, dtype=kept.dtype, device=device)
                targets.append((key, target))
                state[name] = target
            new_state[param] = state

    def install() -> str:
        for owner, owner_state in new_state.items():
            if owner_state:
                optimizer.state[owner] = owner_state
            else:
                optimizer.state.pop(owner, None)
        return "restored"

    return targets, install


@dataclass(frozen=True)
class CaptureMeta:
    """Travels with a capture through the store and commits atomically with its tensors:
    the model's state-dict keys (tensors, then extra-state entries), the extra state itself,
    and the optimizer's state layout (None when no optimizer was captured)."""

    model_keys: tuple[str, ...]
    extras: dict[str, object]
    optimizer: OptimizerSnapshot | None


@dataclass(frozen=True)
class CaptureContents:
    """One capture, ready for :meth:`SnapshotStore.capture`: ``entries`` are the live model
    tensors followed by the optimizer-state tensors, ``meta`` goes along as the capture's meta,
    ``excluded`` lists the state-dict keys of non-fossilized seeds that were left out."""

    entries: list[tuple[str, torch.Tensor]]
    meta: CaptureMeta
    excluded: tuple[str, ...]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_optimizer(optimizer: object) -> None:
    """TypeError naming the type unless ``optimizer`` is a torch.optim.Optimizer or None."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def model_entries(
    model: nn.Module,
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]:
    """The model's state split for a snapshot, leaving out everything of non-fossilized seeds:
    their ``seed.`` and ``alpha_schedule.`` subtrees and their ``_extra_state``.

    Returns the live tensors (not copies), the non-tensor extra-state entries and the excluded
    keys, as :func:`state_dict_entries` does."""
    return state_dict_entries(model, excluded_seed_keys(model))


def capture_contents(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> CaptureContents:
    """Everything one Governor snapshot captures: the model (minus non-fossilized seeds), its
    extra state (deep-copied now, so later changes cannot leak into the LKG) and the
    optimizer's per-parameter state."""
    tensors, extras, excluded = model_entries(model)
    opt_tensors, opt_snapshot = optimizer_entries(optimizer)
    keys = tuple(k for k, _ in tensors) + tuple(extras)
    meta = CaptureMeta(keys, copy.deepcopy(extras), opt_snapshot)
    return CaptureContents(tensors + opt_tensors, meta, excluded)


def restore_contents(
    store: SnapshotStore,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    saved: dict[str, torch.Tensor],
    meta: CaptureMeta,
) -> str:
    """Write the committed LKG (``saved``, with its ``meta``) back into ``model`` and
    ``optimizer``: the host and fossilized seeds in place through the store, then the module
    extra state, then the optimizer state. Returns the optimizer outcome: ``"restored"``,
    ``"cleared"`` (its state was not captured with this LKG) or ``"untouched"`` (no optimizer).

    Raises what :meth:`SnapshotStore.restore` raises (nothing is written in that case)."""
    tensors, extras, _ = model_entries(model)
    opt_targets, finish_optimizer = optimizer_restore_plan(optimizer, meta.optimizer, saved)
    store.restore(tensors + opt_targets)
    restore_extra_state(model, meta.extras, extras)
    return finish_optimizer()


def key_drift(model: nn.Module, meta: CaptureMeta) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(missing, unexpected)``: live state-dict keys with no saved value, and saved keys with
    no live entry, both in a stable order (non-fossilized seeds are not live keys here)."""
    live_tensors, live_extras, _ = model_entries(model)
    live_keys = [k for k, _ in live_tensors] + list(live_extras)
    saved_set, live_set = set(meta.model_keys), set(live_keys)
    missing = tuple(k for k in live_keys if k not in saved_set)
    unexpected = tuple(k for k in meta.model_keys if k not in live_set)
    return missing, unexpected


def order_steps_after_captures(optimizer: torch.optim.Optimizer, store: SnapshotStore) -> Any:
    """Install an optimizer step pre-hook that makes the step wait (on the GPU, no host sync) for
    the store's in-flight capture; returns the hook's removable handle.

    The hook holds the store weakly and is removed when the store is collected: an optimizer
    that outlives its Governor must neither keep the store's host buffers (two model copies)
    alive nor pile up one hook per Governor ever built on it.
    """
    store_ref = weakref.ref(store)

    def wait_for_capture(_opt: object, _args: object, _kwargs: object) -> None:
        # The step writes the parameters an in-flight capture may still be reading.
        live = store_ref()
        if live is not None:
            live.make_stream_wait()

    handle = optimizer.register_step_pre_hook(wait_for_capture)
    weakref.finalize(store, handle.remove)
    return handle


__all__ = [
    "OPTIMIZER_KEY_PREFIX",
    "CaptureContents",
    "CaptureMeta",
    "OptimizerSnapshot",
    "capture_contents",
    "check_optimizer",
    "device_of",
    "key_drift",
    "model_entries",
    "optimizer_entries",
    "optimizer_restore_plan",
    "order_steps_after_captures",
    "restore_contents",
    "restore_extra_state",
    "state_dict_entries",
]
