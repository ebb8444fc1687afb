"""A rollback, carried out: restore the committed LKG, prune live seeds, report it once.

The Governor decides that a rollback happens (:meth:`TolariaGovernor.execute_rollback`); this
module does it, in this order: refuse an LKG the caller edited (:mod:`tolaria.snapshot.handout`),
restore the host and fossilized seeds in place and the optimizer state captured with them,
prune every live seed, emit exactly one GOVERNOR_ROLLBACK event (carrying key mismatches and
esper-lite's attribution fields), and only then raise on architecture drift, so the LKG and the
panic state stay for another try. While the model is being written it is marked "restore
incomplete" (:mod:`tolaria.restore_state`: a Ctrl-C waits for the restore to finish; anything
else that interrupts it leaves the mark, and the next rollback completes it).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tolaria.restore_state import RestoreState
from tolaria.snapshot import seeds
from tolaria.snapshot.entries import CaptureMeta, LiveEntries, device_of, key_drift, restore_contents
from tolaria.snapshot.handout import LkgHandout
from tolaria.snapshot.optimizer_state import UNTOUCHED, OptimizerOutcome
from tolaria.snapshot.store import SnapshotStore
from tolaria.telemetry.events import Ranked, rollback_event
from tolaria.telemetry.hub import TelemetryHub
from tolaria.telemetry.payloads import GovernorRollbackPayload
from tolaria.watch import Watch

#: ``GovernorReport.reason`` of every rollback, as in the original Governor; the specific cause
#: is ``panic_reason``.
STRUCTURAL_COLLAPSE = "Structural Collapse"
#: The telemetry payload's ``reason`` of a rollback that no panic preceded.
REASON_MANUAL_ROLLBACK = "governor_manual_rollback"


@dataclass(frozen=True)
class GovernorReport:
    """The result of one :meth:`TolariaGovernor.execute_rollback`.

    The first five fields are the original Governor's: ``reason`` is always
    ``"Structural Collapse"``; ``loss_at_panic`` is the Governor's ``_panic_loss`` (the loss of
    the latest loss panic or divergence anomaly; NaN when there was none: a manual rollback, or
    a health panic); ``consecutive_panics`` is the count AFTER the rollback, i.e. 0 (the
    telemetry payload carries the count at the panic). ``panic_reason`` is the specific cause
    (``governor_nan``, ``governor_divergence``, ``governor_nonfinite_params``, ...; None for a
    manual rollback). ``missing_keys`` / ``unexpected_keys`` are state-dict keys with no saved
    value / no live tensor (only keys under ``seed_slots.`` can appear here: others raise).
    ``optimizer_state`` is "restored" (every parameter of the optimizer got its captured state
    back), "cleared" (none had captured state, so none has state now: a snapshot taken before
    the first step, or an optimizer first seen at this rollback), "partial" (some of each, e.g.
    a param group added after the snapshot) or "untouched" (no optimizer); ``optimizer_groups``
    says the same per param group. ``panic_step`` is the label of the observed step whose
    deferred verdict panicked, None after a blocking check.
    ``recovery_action`` says what a :class:`tolaria.RecoveryPolicy` did after the rollback
    (``"lr_backoff"``, ``"lr_backoff+moment_reset"``, ``"observed"`` in shadow mode, where
    ``rollback_occurred`` is False and nothing was touched; ``""`` without a policy).
    """

    reason: str
    loss_at_panic: float
    loss_threshold: float
    consecutive_panics: int
    rollback_occurred: bool
    panic_reason: str | None = None
    env_id: int = 0
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    pruned_slots: tuple[str, ...] = ()
    optimizer_state: str = UNTOUCHED
    panic_step: int | None = None
    recovery_action: str = ""
    optimizer_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Attribution:
    """esper-lite's attribution of a rollback to the action that caused it; every field travels
    in the GOVERNOR_ROLLBACK payload unchanged (None: not given)."""

    triggering_action_id: str | None = None
    raw_penalty: float | None = None
    normalized_penalty: float | None = None
    rollback_severity: float | None = None
    watch_window_evidence: float | None = None
    episode_idx: int | None = None
    #: Identities of the batches seen between the LKG and the panic (a resumed run skips them).
    skipped_batches: tuple[Any, ...] = ()


def check_env_id(env_id: object) -> int:
    """``env_id`` validated: an int (not a bool); TypeError naming it otherwise."""
    if isinstance(env_id, bool) or not isinstance(env_id, int):
        raise TypeError(f"env_id must be an int, got {type(env_id).__name__} {env_id!r}")
    return env_id


def _reported_loss(watch: Watch) -> float:
    """``loss_at_panic``: the original's ``_panic_loss``, NaN when there is none."""
    return math.nan if watch.panic_loss is None else float(watch.panic_loss)


def _emit_or_warn(hub_source: Callable[[], TelemetryHub], event: Any) -> None:
    """Emit the rollback event; a failure (a broken or patched hub) must not undo a rollback
    that has already happened, so it becomes one line on stderr, the original's wording."""
    try:
        hub_source().emit(event)
    except Exception as error:
        print(f"WARNING: Governor rollback succeeded but telemetry emission failed: {error}", file=sys.stderr)


def perform_rollback(
    *,
    store: SnapshotStore,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    watch: Watch,
    handout: LkgHandout | None,
    hub_source: Callable[[], TelemetryHub],
    ranked: Ranked,
    fault_ranks: tuple[int, ...],
    env_id: int,
    attribution: Attribution,
    restore_state: RestoreState | None = None,
    live_entries: Callable[[nn.Module], LiveEntries | None] | None = None,
) -> tuple[GovernorReport, OptimizerOutcome]:
    """Roll ``model`` (and ``optimizer``) back to the store's committed LKG; returns the report
    and the optimizer outcome. ``handout``: the ``last_good_state`` dict given to the caller for
    this LKG, if any (verified before anything is written). ``restore_state`` is marked
    incomplete while the model is written (:mod:`tolaria.restore_state`). ``live_entries(model)``
    gives the model's entries without a state-dict walk when a kept capture plan still holds
    (None: walk), asked again after the prune, which may have changed the model.

    Raises RuntimeError when there is no LKG or the handed-out dict was edited (nothing written),
    SnapshotMismatchError when a saved tensor no longer fits (nothing written), and RuntimeError
    on architecture drift or a sick late fossil (after the restore and the event). Whatever
    escapes while the model is written leaves ``restore_state`` marked.
    """
    saved, meta = store.last_good_state, store.lkg_meta
    if saved is None or not isinstance(meta, CaptureMeta):
        raise RuntimeError("no Last Known Good snapshot to roll back to (no snapshot was ever committed)")
    if handout is not None and handout.source is saved:
        handout.verify()
    with (restore_state if restore_state is not None else RestoreState()).writing():
        known = live_entries(model) if live_entries is not None else None
        outcome = restore_contents(store, model, optimizer, saved, meta, live=known)
        pruned = seeds.prune_live_seeds(model)
    after = (live_entries(model) if pruned else known) if live_entries is not None else None
    missing, unexpected = key_drift(model, meta, live=after)
    panic, panicked = watch.panic_for_rollback(REASON_MANUAL_ROLLBACK)
    panic_reason = watch.panic_reason
    loss = _reported_loss(watch)
    payload = GovernorRollbackPayload(
        env_id=env_id,
        device=str(device_of(model)),
        reason=panic_reason or REASON_MANUAL_ROLLBACK,
        loss_at_panic=loss,
        loss_threshold=panic.threshold,
        consecutive_panics=max(panic.consecutive, watch.loss.consecutive_panics),
        panic_reason=panic_reason,
        missing_keys=missing,
        unexpected_keys=unexpected,
        episode_idx=attribution.episode_idx,
        triggering_action_id=attribution.triggering_action_id,
        raw_penalty=attribution.raw_penalty,
        normalized_penalty=attribution.normalized_penalty,
        rollback_severity=attribution.rollback_severity,
        watch_window_evidence=attribution.watch_window_evidence,
        skipped_batches=attribution.skipped_batches,
    )
    _emit_or_warn(hub_source, rollback_event(payload, fault_ranks, ranked))
    seeds.raise_on_drift(missing, unexpected)
    seeds.raise_on_sick_unsaved_fossils(model, missing)
    watch.clear_panic()
    report = GovernorReport(
        reason=STRUCTURAL_COLLAPSE,
        loss_at_panic=loss,
        loss_threshold=panic.threshold,
        consecutive_panics=0,
        rollback_occurred=True,
        panic_reason=panic_reason,
        env_id=env_id,
        missing_keys=missing,
        unexpected_keys=unexpected,
        pruned_slots=pruned,
        optimizer_state=outcome.state,
        panic_step=panic.step if panicked else None,
        optimizer_groups=outcome.groups,
    )
    return report, outcome


def observed_report(watch: Watch, env_id: int, action: str) -> GovernorReport:
    """Shadow mode's answer to a rollback request: what would have been reported, with
    ``rollback_occurred=False``; the panic state is cleared so detection goes on."""
    panic, panicked = watch.panic_for_rollback(REASON_MANUAL_ROLLBACK)
    report = GovernorReport(
        reason=STRUCTURAL_COLLAPSE,
        loss_at_panic=_reported_loss(watch),
        loss_threshold=panic.threshold,
        consecutive_panics=0,
        rollback_occurred=False,
        panic_reason=watch.panic_reason,
        env_id=env_id,
        panic_step=panic.step if panicked else None,
        recovery_action=action,
    )
    watch.clear_panic()
    return report


__all__ = [
    "REASON_MANUAL_ROLLBACK",
    "STRUCTURAL_COLLAPSE",
    "Attribution",
    "GovernorReport",
    "check_env_id",
    "observed_report",
    "perform_rollback",
]
