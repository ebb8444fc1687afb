"""The Governor's telemetry events, built from what it decided: a panic, a rollback, the end of a
capture. One builder per event kind, so every message and payload is worded in one place.
``ranked`` adds the rank fields of a process group to a payload (identity without one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tolaria.telemetry.payloads import (
    GovernorPanicPayload,
    GovernorRollbackPayload,
    GovernorSnapshotPayload,
    HealthAlertPayload,
    Severity,
    TelemetryEvent,
    TelemetryEventType,
)

if TYPE_CHECKING:
    from tolaria.commit import Resolved
    from tolaria.watch import Panic

Ranked = Callable[[Any, tuple[int, ...]], Any]


def snapshot_events(resolved: Resolved, device: str, ranked: Ranked) -> list[TelemetryEvent]:
    """The events that report a resolved capture: one GOVERNOR_SNAPSHOT (committed, rejected as
    sick, vetoed by other ranks, or withheld because a deferred verdict condemned it), plus a
    HEALTH_ALERT naming the sick tensors when this capture itself was sick."""
    info, resolution, state = resolved.info, resolved.resolution, resolved.state.value
    ok = resolution.committed
    if ok:
        message = "snapshot committed"
    elif state == "withheld":
        message = f"snapshot discarded: {resolved.withheld}"
    elif state == "vetoed":
        message = f"snapshot vetoed by rank(s) {list(resolved.veto_ranks)}: their capture was not healthy"
    else:
        message = "snapshot rejected: non-finite values"
    payload = GovernorSnapshotPayload(
        device=device, backend=info.backend, keys_captured=len(info.keys_captured),
        keys_excluded=len(info.keys_excluded), bytes=info.bytes, seconds=info.seconds, committed=ok,
        first_bad=resolution.first_bad,
    )  # fmt: skip
    severity = Severity.DEBUG if ok else Severity.WARNING
    events = [
        TelemetryEvent(
            TelemetryEventType.GOVERNOR_SNAPSHOT, severity, message, ranked(payload, resolved.veto_ranks)
        )
    ]
    if state != "rejected":
        return events
    report = resolution.report
    bad = () if report is None else tuple(n for n, c in zip(report.names, report.nonfinite, strict=True) if c)
    alert = HealthAlertPayload(
        source="snapshot", device=device, first_bad=resolution.first_bad,
        nonfinite=0 if report is None else report.total_nonfinite, bad_tensors=bad[:32],
        backend="" if report is None else report.backend,
    )  # fmt: skip
    message = f"snapshot not committed, first non-finite tensor: {resolution.first_bad}"
    events.append(TelemetryEvent(TelemetryEventType.HEALTH_ALERT, Severity.ERROR, message, alert))
    return events


def panic_event(panic: Panic, device: str, ranks: tuple[int, ...], ranked: Ranked) -> TelemetryEvent:
    """The GOVERNOR_PANIC event of a :class:`tolaria.watch.Panic` (first sick tensor, the ranks
    that saw it, and the observed step of a deferred verdict in the message)."""
    sick = f" (first sick tensor: {panic.first_bad})" if panic.first_bad else ""
    seen = f" (seen by rank(s) {list(ranks)})" if ranks else ""
    late = f" (deferred verdict of step {panic.step})" if panic.step is not None else ""
    payload = GovernorPanicPayload(
        reason=panic.reason, device=device, loss=panic.loss, loss_threshold=panic.threshold,
        consecutive_panics=panic.consecutive, first_bad=panic.first_bad, grad_norm=panic.grad_norm,
    )  # fmt: skip
    message = f"panic: {panic.reason}{sick}{seen}{late}"
    return TelemetryEvent(TelemetryEventType.GOVERNOR_PANIC, Severity.ERROR, message, ranked(payload, ranks))


def rollback_event(
    payload: GovernorRollbackPayload, ranks: tuple[int, ...], ranked: Ranked
) -> TelemetryEvent:
    """The one GOVERNOR_ROLLBACK event of a rollback (the ranks that saw the panic, if any)."""
    seen = f", seen by rank(s) {list(ranks)}" if ranks else ""
    message = f"rolled back to the last known good state ({payload.reason}{seen})"
    return TelemetryEvent(
        TelemetryEventType.GOVERNOR_ROLLBACK, Severity.WARNING, message, ranked(payload, ranks)
    )


__all__ = ["panic_event", "rollback_event", "snapshot_events"]
