"""What a Governor snapshot holds, and how it goes back: model and optimizer entries.

A snapshot is more than ``model.state_dict()``:

* the experimental parts of a morphogenetic model are left out (:mod:`tolaria.snapshot.seeds`
  says which), because a rollback prunes those seeds instead of restoring them;
* non-tensor module extra state travels beside the tensors (deep-copied, by key);
* the optimizer's per-parameter state is captured as store entries together with the weights,
  so both commit atomically (:mod:`tolaria.snapshot.optimizer_state`);
* a sharded (FSDP2 / DTensor) tensor is captured as this rank's local shard (``to_local()``,
  the same memory) under the full state-dict key, and restored into it in place.
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

from tolaria.health.kinds import local_tensor
from tolaria.snapshot.kinds import check_snapshottable
from tolaria.snapshot.optimizer_state import (
    OPTIMIZER_KEY_PREFIX,
    OptimizerOutcome,
    OptimizerSnapshot,
    check_optimizer_params,
    optimizer_entries,
    optimizer_restore_plan,
)
from tolaria.snapshot.seeds import excluded_seed_keys
from tolaria.snapshot.store import SnapshotStore

_EXTRA_STATE = "_extra_state"


def state_dict_entries(
    model: nn.Module, excluded: Callable[[str], bool]
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]:
    """Split ``model.state_dict(keep_vars=True)`` into tensors, non-tensor entries (module extra
    state, kept by key) and the keys for which ``excluded(key)`` is true. Tensors are the live
    ones (not copies; a DTensor's local shard); parameters keep their identity."""
    tensors: list[tuple[str, torch.Tensor]] = []
    extras: dict[str, object] = {}
    dropped: list[str] = []
    for key, value in model.state_dict(keep_vars=True).items():
        if excluded(key):
            dropped.append(key)
        elif isinstance(value, torch.Tensor):
            tensors.append((key, local_tensor(value)))
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
    ``excluded`` lists the state-dict keys of non-fossilized seeds that were left out. A
    :class:`tolaria.snapshot.capture_plan.CapturePlans` hands ``entries`` as one key → tensor
    mapping, reused between captures while nothing changed (read-only)."""

    entries: list[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]
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


#: What :func:`model_entries` returns: live tensors, non-tensor extra state, excluded keys.
LiveEntries = tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]


def model_entries(
    model: nn.Module,
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]:
    """The model's state split for a snapshot, leaving out everything of non-fossilized seeds:
    their ``seed.`` and ``alpha_schedule.`` subtrees and their ``_extra_state``.

    Returns the live tensors (not copies), the non-tensor extra-state entries and the excluded
    keys, as :func:`state_dict_entries` does."""
    return state_dict_entries(model, excluded_seed_keys(model))


def check_model_snapshottable(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """ValueError naming the first model or optimizer-state tensor that cannot be snapshotted
    (meta, lazy, quantized, sparse, a dispatch subclass; :mod:`tolaria.snapshot.kinds`) and what
    to do, before anything is copied."""
    tensors, _, _ = model_entries(model)
    check_snapshottable(tensors, "model tensor")
    check_snapshottable(optimizer_entries(optimizer)[0], "optimizer state")


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
    live: LiveEntries | None = None,
) -> OptimizerOutcome:
    """Write the committed LKG (``saved``, with its ``meta``) back into ``model`` and
    ``optimizer``: the host and fossilized seeds in place through the store, then the module
    extra state, then the optimizer state. Returns what happened to the optimizer state
    (:class:`OptimizerOutcome`: per group "restored", "cleared" or "partial"; "untouched"
    without an optimizer).

    ``live``: the model's entries as :func:`model_entries` returns them, when the caller knows
    them still to be exact (a kept capture plan): no state-dict walk then.

    Raises what :meth:`SnapshotStore.restore` raises (nothing is written in that case)."""
    tensors, extras, _ = model_entries(model) if live is None else live
    opt_targets, finish_optimizer = optimizer_restore_plan(optimizer, meta.optimizer, saved)
    store.restore(tensors + opt_targets)
    restore_extra_state(model, meta.extras, extras)
    return finish_optimizer()


def key_drift(
    model: nn.Module, meta: CaptureMeta, live: LiveEntries | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(missing, unexpected)``: live state-dict keys with no saved value, and saved keys with
    no live entry, both in a stable order (non-fossilized seeds are not live keys here).
    ``live``: as for :func:`restore_contents`."""
    live_tensors, live_extras, _ = model_entries(model) if live is None else live
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
    "LiveEntries",
    "OPTIMIZER_KEY_PREFIX",
    "CaptureContents",
    "CaptureMeta",
    "OptimizerOutcome",
    "OptimizerSnapshot",
    "capture_contents",
    "check_model_snapshottable",
    "check_optimizer",
    "check_optimizer_params",
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
