"""What the Governor puts into a snapshot, and how it comes back out.

A Governor snapshot is more than ``model.state_dict()``:

* the experimental parts of a morphogenetic model are left out: every key of a seed slot that
  is not fossilized (its ``seed.`` and ``alpha_schedule.`` subtrees and its ``_extra_state``),
  because a rollback prunes those seeds instead of restoring them;
* non-tensor module extra state travels beside the tensors (deep-copied, by key);
* the optimizer's per-parameter state is captured as store entries together with the weights,
  so that both commit atomically: zeroed Adam moments with a kept step count would make the
  next updates about 3x too large.

This module composes those pieces on top of the store helpers in :mod:`tolaria.snapshot.store`;
the Governor only decides when to capture and restore.
"""

from __future__ import annotations

import copy
import itertools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tolaria import telemetry as tm
from tolaria.snapshot import store as snap

SEED_SLOTS_PREFIX = "seed_slots."


@dataclass(frozen=True)
class CaptureMeta:
    """Travels with a capture through the store and commits atomically with its tensors:
    the model's state-dict keys (tensors, then extra-state entries), the extra state itself,
    and the optimizer's state layout (None when no optimizer was captured)."""

    model_keys: tuple[str, ...]
    extras: dict[str, object]
    optimizer: snap.OptimizerSnapshot | None


@dataclass(frozen=True)
class SnapshotInfo:
    """What one :meth:`TolariaGovernor.snapshot` did. ``keys_captured`` are model state-dict keys
    (optimizer state travels too but is not listed); ``keys_excluded`` belong to non-fossilized
    seeds. ``bytes`` counts tied tensors once. ``seconds`` is how long the call blocked the host.
    ``committed`` is None while an asynchronous (CUDA) capture is still in flight: it is then
    verified at the next snapshot, rollback or ``last_good_state`` read."""

    keys_captured: tuple[str, ...]
    keys_excluded: tuple[str, ...]
    bytes: int
    backend: str
    seconds: float
    committed: bool | None
    first_bad: str | None = None


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


def is_fossilized(slot: object) -> bool:
    """Whether a seed slot's seed has been made permanent (its stage is ``FOSSILIZED``)."""
    stage = getattr(getattr(slot, "state", None), "stage", None)
    return str(getattr(stage, "name", stage)).upper() == "FOSSILIZED"


def _seed_slots(model: nn.Module) -> list[tuple[Any, Any]]:
    slots: Any = getattr(model, "seed_slots", None)
    return list(slots.items()) if hasattr(slots, "items") else []


def model_entries(
    model: nn.Module,
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]:
    """The model's state split for a snapshot, leaving out everything of non-fossilized seeds:
    their ``seed.`` and ``alpha_schedule.`` subtrees and their ``_extra_state``.

    Returns the live tensors (not copies), the non-tensor extra-state entries and the excluded
    keys, as :func:`tolaria.snapshot.store.state_dict_entries` does."""
    prefixes, exact = [], set()
    for slot_id, slot in _seed_slots(model):
        if not is_fossilized(slot):
            base = f"{SEED_SLOTS_PREFIX}{slot_id}."
            prefixes += [base + "seed.", base + "alpha_schedule."]
            exact.add(base + "_extra_state")
    starts = tuple(prefixes)
    return snap.state_dict_entries(model, lambda key: key in exact or key.startswith(starts))


def capture_contents(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> CaptureContents:
    """Everything one Governor snapshot captures: the model (minus non-fossilized seeds), its
    extra state (deep-copied now, so later changes cannot leak into the LKG) and the
    optimizer's per-parameter state."""
    tensors, extras, excluded = model_entries(model)
    opt_tensors, opt_snapshot = snap.optimizer_entries(optimizer)
    keys = tuple(k for k, _ in tensors) + tuple(extras)
    meta = CaptureMeta(keys, copy.deepcopy(extras), opt_snapshot)
    return CaptureContents(tensors + opt_tensors, meta, excluded)


def restore_contents(
    store: snap.SnapshotStore,
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
    opt_targets, finish_optimizer = snap.optimizer_restore_plan(optimizer, meta.optimizer, saved)
    store.restore(tensors + opt_targets)
    snap.restore_extra_state(model, meta.extras, extras)
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


def order_steps_after_captures(optimizer: torch.optim.Optimizer, store: snap.SnapshotStore) -> Any:
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


def snapshot_events(
    info: SnapshotInfo,
    resolution: snap.Resolution,
    device: str,
    veto_ranks: tuple[int, ...],
    ranked: Callable[[tm.GovernorSnapshotPayload, tuple[int, ...]], tm.GovernorSnapshotPayload],
    withheld: str = "",
) -> list[tm.TelemetryEvent]:
    """The events that report a resolved capture: one GOVERNOR_SNAPSHOT (committed, rejected as
    sick, vetoed by ``veto_ranks`` of a process group, or discarded by the Governor because of
    ``withheld``: a deferred verdict condemned it), plus a HEALTH_ALERT naming the sick tensors
    when this capture itself was sick. ``ranked`` adds rank fields to the payload."""
    ok = resolution.committed
    if ok:
        message = "snapshot committed"
    elif resolution.vetoed and withheld:
        message = f"snapshot discarded: {withheld}"
    elif resolution.vetoed:
        message = f"snapshot vetoed by rank(s) {list(veto_ranks)}: their capture was not healthy"
    else:
        message = "snapshot rejected: non-finite values"
    payload = tm.GovernorSnapshotPayload(
        device, info.backend, len(info.keys_captured), len(info.keys_excluded), info.bytes, info.seconds,
        ok, resolution.first_bad,
    )  # fmt: skip
    severity = tm.Severity.DEBUG if ok else tm.Severity.WARNING
    snapshot_event = tm.TelemetryEventType.GOVERNOR_SNAPSHOT
    events = [tm.TelemetryEvent(snapshot_event, severity, message, ranked(payload, veto_ranks))]
    if ok or resolution.vetoed:
        return events
    report = resolution.report
    bad = () if report is None else tuple(n for n, c in zip(report.names, report.nonfinite, strict=True) if c)
    alert = tm.HealthAlertPayload(
        "snapshot", device, resolution.first_bad, 0 if report is None else report.total_nonfinite,
        bad[:32], "" if report is None else report.backend,
    )  # fmt: skip
    message = f"snapshot not committed, first non-finite tensor: {resolution.first_bad}"
    events.append(tm.TelemetryEvent(tm.TelemetryEventType.HEALTH_ALERT, tm.Severity.ERROR, message, alert))
    return events


def panic_event(panic: Any, device: str, ranks: tuple[int, ...], ranked: Callable[[Any, tuple[int, ...]], Any]
                ) -> tm.TelemetryEvent:  # fmt: skip
    """The GOVERNOR_PANIC event of a :class:`tolaria.watch.Panic` (first sick tensor, the ranks
    that saw it, and the observed step of a deferred verdict in the message)."""
    sick = f" (first sick tensor: {panic.first_bad})" if panic.first_bad else ""
    seen = f" (seen by rank(s) {list(ranks)})" if ranks else ""
    late = f" (deferred verdict of step {panic.step})" if panic.step is not None else ""
    payload = tm.GovernorPanicPayload(
        panic.reason, device, panic.loss, panic.threshold, panic.consecutive, panic.first_bad, panic.grad_norm
    )
    message = f"panic: {panic.reason}{sick}{seen}{late}"
    return tm.TelemetryEvent(tm.TelemetryEventType.GOVERNOR_PANIC, tm.Severity.ERROR, message,
                             ranked(payload, ranks))  # fmt: skip


def rollback_event(payload: tm.GovernorRollbackPayload, ranks: tuple[int, ...],
                   ranked: Callable[[Any, tuple[int, ...]], Any]) -> tm.TelemetryEvent:  # fmt: skip
    """The one GOVERNOR_ROLLBACK event of a rollback (the ranks that saw the panic, if any)."""
    seen = f", seen by rank(s) {list(ranks)}" if ranks else ""
    message = f"rolled back to the last known good state ({payload.reason}{seen})"
    return tm.TelemetryEvent(tm.TelemetryEventType.GOVERNOR_ROLLBACK, tm.Severity.WARNING, message,
                             ranked(payload, ranks))  # fmt: skip


def raise_on_drift(missing: tuple[str, ...], unexpected: tuple[str, ...]) -> None:
    """RuntimeError when keys outside ``seed_slots.`` are missing or unexpected: architecture
    drift must not pass silently (seed keys come and go with pruning and are fine)."""
    drift_missing = [k for k in missing if not k.startswith(SEED_SLOTS_PREFIX)]
    drift_unexpected = [k for k in unexpected if not k.startswith(SEED_SLOTS_PREFIX)]
    if drift_missing or drift_unexpected:
        raise RuntimeError(
            f"architecture drift: keys outside {SEED_SLOTS_PREFIX!r} are missing {drift_missing} or "
            f"unexpected {drift_unexpected}; matching weights were restored and the LKG is kept"
        )


def raise_on_sick_unsaved_fossils(model: nn.Module, missing: tuple[str, ...]) -> None:
    """RuntimeError when a seed fossilized after the last snapshot holds NaN/Inf weights.

    Its keys were not captured (it was still experimental then), so the rollback cannot restore
    it, and a fossil cannot be pruned: keeping it would make the next step panic again, forever.
    A healthy late fossil is fine (the next snapshot captures it) and passes.
    """
    missing_set = set(missing)
    sick: list[str] = []
    for slot_id, slot in _seed_slots(model):
        seed = getattr(slot, "seed", None)
        if seed is None or not is_fossilized(slot):
            continue
        prefix = f"{SEED_SLOTS_PREFIX}{slot_id}.seed."
        if not any(key.startswith(prefix) for key in missing_set):
            continue
        if any(not bool(torch.isfinite(p).all()) for p in seed.parameters()):
            sick.append(str(slot_id))
    if sick:
        raise RuntimeError(
            f"seed slot(s) {sick} were fossilized after the last committed snapshot and hold non-finite "
            "weights: the Last Known Good has no copy of them and a fossil cannot be pruned; take a "
            "snapshot right after fossilizing a seed (the rest of the model was restored, the LKG is kept)"
        )


def prune_live_seeds(model: nn.Module, log: logging.Logger) -> tuple[str, ...]:
    """Prune every live (present, staged, not fossilized) seed with ``initiator="governor"``;
    returns the pruned slot ids. A failing prune is logged through ``log`` and skipped, never
    raised: one broken seed must not stop the rollback of the others."""
    pruned: list[str] = []
    for slot_id, slot in _seed_slots(model):
        if getattr(slot, "seed", None) is None or getattr(slot, "state", None) is None or is_fossilized(slot):
            continue
        try:
            slot.prune("governor_rollback", initiator="governor")
            pruned.append(str(slot_id))
        except Exception:
            log.exception("pruning seed slot %r after a rollback failed; continuing", slot_id)
    return tuple(pruned)


__all__ = [
    "raise_on_sick_unsaved_fossils",
    "SEED_SLOTS_PREFIX",
    "CaptureContents",
    "CaptureMeta",
    "SnapshotInfo",
    "capture_contents",
    "check_optimizer",
    "device_of",
    "is_fossilized",
    "key_drift",
    "model_entries",
    "order_steps_after_captures",
    "panic_event",
    "prune_live_seeds",
    "raise_on_drift",
    "rollback_event",
    "snapshot_events",
    "restore_contents",
]
