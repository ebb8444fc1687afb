"""What one guarded step did: :class:`StepOutcome`, returned by :class:`tolaria.guard.GuardedStep`
and by :meth:`tolaria.hooks.TrainerHook.after_backward`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tolaria.governor import GovernorReport, SnapshotInfo


@dataclass(frozen=True)
class StepOutcome:
    """What one guarded step (:class:`tolaria.guard.GuardedStep`) or one
    :meth:`TrainerHook.after_backward` call did.

    Attributes:
        step: index of the call (0-based); rolled-back attempts and micro-batches count too.
        loss: the judged loss as a float: the given loss times ``loss_scale``, exactly as seen
            (NaN/Inf included); NaN in deferred mode for a CUDA loss unless ``synchronize`` is on,
            and NaN when no loss was given.
        grad_norm: global L2 norm of the model's gradients in true units, when ``track_grad_norm``
            is on and the gradients were judged; None otherwise (also for an overflow step).
        panic_reason: the panic reason (``governor_nan``, ``governor_lobotomy``,
            ``governor_scaler_overflow``, ...), None for a healthy step.
        panic_step: the step whose checks found the fault: ``step`` itself in blocking mode, an
            earlier step when a deferred verdict arrived late; None for a healthy step.
        report: the rollback's :class:`GovernorReport`, None when there was no rollback (in shadow
            mode, ``RecoveryPolicy(mode="observe")``, the report of the rollback that was NOT done:
            ``report.rollback_occurred`` is False and the step went on as if unguarded).
        snapshot: the snapshot taken during this step, None when none was due.
        stepped: whether the optimizer step took effect: ``GuardedStep`` ran it; for
            :class:`TrainerHook`, the trainer's step that follows will update the weights (False
            after a rollback, for an overflow and for a micro-batch before the last).
        anomaly_streak: ``governor.anomaly_streak`` after the checks: > 0 while a loss divergence
            or a gradient-norm explosion streak is building (such steps still step the optimizer
            but never snapshot).
        check_seconds, snapshot_seconds, rollback_seconds: host time inside the Governor's
            checks, ``snapshot()`` and ``execute_rollback()``.
        step_seconds: host time of the whole call (``GuardedStep``: forward, backward, step and
            Governor; ``TrainerHook``: from :meth:`TrainerHook.begin` to the outcome).
        scaler_skipped: the GradScaler found an overflow and skips this optimizer step.
        accumulating: a micro-batch before the last of its accumulation window: only its loss
            was judged.
        recovery_action: what the Governor's :class:`tolaria.RecoveryPolicy` did after this
            step's rollback (``"lr_backoff"``, ``"lr_backoff+moment_reset"``, ``"observed"``);
            ``""`` without a policy or a rollback.
        skipped_batches: the batch identities (``batch_id``) of the window the rollback abandoned,
            as recorded in the rollback event and the skip file.
    """

    step: int
    loss: float
    grad_norm: float | None
    panic_reason: str | None
    report: GovernorReport | None
    snapshot: SnapshotInfo | None
    stepped: bool
    anomaly_streak: int
    check_seconds: float
    snapshot_seconds: float
    rollback_seconds: float
    step_seconds: float
    panic_step: int | None = None
    scaler_skipped: bool = False
    accumulating: bool = False
    recovery_action: str = ""
    skipped_batches: tuple[Any, ...] = ()

    @property
    def rolled_back(self) -> bool:
        """True when this step ended in a rollback to the Last Known Good."""
        return self.report is not None and self.report.rollback_occurred

    @property
    def healthy(self) -> bool:
        """True when no check panicked."""
        return self.panic_reason is None

    @property
    def governor_seconds(self) -> float:
        """All host time spent inside Governor calls during this step."""
        return self.check_seconds + self.snapshot_seconds + self.rollback_seconds


__all__ = ["StepOutcome"]
