"""What a demo run found: per-fault records, the tracker that fills them, the run's result.

A fault counts as **detected** when a rollback happens at or after its injection step and before
the next fault is injected. It counts as **recovered** when, after its last rollback, the next
``recovery_window`` steps run without a panic and their mean loss is back near the loss before
the fault: at most ``loss_before + max(0.25 · (random_guess_loss − loss_before), 0.1 · loss_before)``,
i.e. the model regained at least three quarters of what it had learned beyond a uniform guess.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tolaria.demo.faults import ScheduledFault
from tolaria.guard import StepOutcome


def recovery_limit(loss_before: float, random_guess_loss: float) -> float:
    """The highest mean loss after a rollback that still counts as recovered (see module doc)."""
    if not math.isfinite(loss_before):
        return random_guess_loss
    return loss_before + max(0.25 * (random_guess_loss - loss_before), 0.1 * abs(loss_before))


def _mean(values: list[float] | deque[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


@dataclass
class FaultRecord:
    """One injected fault and what became of it. Losses are in nats; NaN where unknown."""

    kind: str
    injected_step: int
    loss_before: float
    recovery_limit: float
    detected_step: int | None = None
    reason: str | None = None
    rollback_ms: float = math.nan
    rollbacks: int = 0
    loss_after: float = math.nan
    recovered: bool = False
    note: str = ""
    #: A recurring fault (``lr_storm``): recovery is judged only from this step on, when it ends.
    hold_until: int | None = None
    #: The same storm under plain rollbacks (the demo's control run): how many, and when.
    plain_rollbacks: int | None = None
    plain_rollback_steps: list[int] = field(default_factory=list)

    @property
    def detected(self) -> bool:
        return self.detected_step is not None

    @property
    def ok(self) -> bool:
        """Detected, rolled back and recovered."""
        return self.detected and self.recovered

    @property
    def escaped(self) -> bool | None:
        """For a storm: whether the policy needed fewer rollbacks than plain rollbacks (None
        when there was no control run)."""
        if self.plain_rollbacks is None:
            return None
        return self.rollbacks < self.plain_rollbacks

    def failure_message(self) -> str | None:
        """Why this fault failed the run, naming it; None when it is :attr:`ok`."""
        if self.ok:
            return None
        what = f"fault {self.kind}@{self.injected_step}"
        if not self.detected:
            return f"{what} was NOT detected: {self.note or 'no rollback followed it'}"
        caught = f"was detected at step {self.detected_step} ({self.reason})"
        return f"{what} {caught} but training did not recover: {self.note}"


class FaultTracker:
    """Attributes each step's outcome to the fault in flight and decides detection and recovery."""

    def __init__(self, random_guess_loss: float, recovery_window: int = 5) -> None:
        if recovery_window < 1:
            raise ValueError(f"recovery_window must be >= 1, got {recovery_window}")
        self.random_guess_loss = random_guess_loss
        self.recovery_window = recovery_window
        self.records: list[FaultRecord] = []
        self.unattributed_rollbacks: list[int] = []
        self._baseline: deque[float] = deque(maxlen=recovery_window)
        self._current: FaultRecord | None = None
        self._after: list[float] = []

    def on_inject(self, fault: ScheduledFault) -> FaultRecord:
        """A fault was just injected at ``fault.step``; the previous one is judged now."""
        self._close(f"the next fault was injected at step {fault.step}")
        before = _mean(self._baseline)
        record = FaultRecord(fault.kind, fault.step, before, recovery_limit(before, self.random_guess_loss))
        self.records.append(record)
        self._current = record
        self._after = []
        return record

    def plain_rollbacks(self, count: int, steps: list[int]) -> None:
        """The control run's rollbacks so far for the storm in flight (see :mod:`tolaria.demo.twin`)."""
        storms = [record for record in self.records if record.hold_until is not None]
        if storms:
            storms[-1].plain_rollbacks, storms[-1].plain_rollback_steps = count, list(steps)

    def on_outcome(self, outcome: StepOutcome) -> None:
        """Feed one guarded step's outcome (call after :meth:`on_inject` for that step)."""
        record = self._current
        if outcome.rolled_back:
            if record is None:
                self.unattributed_rollbacks.append(outcome.step)
                return
            if record.detected_step is None:
                record.detected_step = outcome.step
                record.reason = outcome.panic_reason
                record.rollback_ms = 1000.0 * outcome.rollback_seconds
            record.rollbacks += 1
            self._after = []  # recovery is measured from the last rollback
            return
        holding = record is not None and record.hold_until is not None and outcome.step < record.hold_until
        if record is not None and record.detected and not holding:
            self._after.append(outcome.loss)
            if len(self._after) >= self.recovery_window:
                self._judge_recovery(record)
                self._current = None
        # Only calm steps define "the loss before a fault": not an anomaly streak, not NaN.
        if outcome.anomaly_streak == 0 and math.isfinite(outcome.loss):
            self._baseline.append(outcome.loss)

    def finish(self) -> list[FaultRecord]:
        """The run ended: judge the fault still in flight; returns all records."""
        self._close("the run ended")
        return self.records

    def _close(self, why: str) -> None:
        record, self._current = self._current, None
        if record is None:
            return
        if not record.detected:
            record.note = f"no rollback between its injection and the moment {why}"
        elif self._after:
            self._judge_recovery(record)
            if record.recovered and len(self._after) < self.recovery_window:
                record.note = f"judged on {len(self._after)} step(s): {why}"
        else:
            record.note = f"no step ran after the rollback before {why}"

    def _judge_recovery(self, record: FaultRecord) -> None:
        record.loss_after = _mean(self._after)
        record.recovered = math.isfinite(record.loss_after) and record.loss_after <= record.recovery_limit
        if not record.recovered:
            record.note = (
                f"mean loss over {len(self._after)} step(s) after the rollback was {record.loss_after:.4g}, "
                f"above the recovery limit {record.recovery_limit:.4g}"
            )


@dataclass
class DemoResult:
    """Everything ``tolaria demo`` measured. ``outcomes`` holds one entry per step; ``injected``
    maps a step to the fault kind injected there; ``seed_events`` are (step, text) of the seed's
    lifecycle. Paths are None when that output was not written."""

    task: str
    device: str
    steps: int
    snapshot_every: int
    random_guess_loss: float
    recovery_window: int = 5
    outcomes: list[StepOutcome] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    injected: dict[int, str] = field(default_factory=dict)
    unattributed_rollbacks: list[int] = field(default_factory=list)
    snapshots_committed: int = 0
    snapshots_rejected: int = 0
    seed_events: list[tuple[int, str]] = field(default_factory=list)
    seed_stage: str = "DORMANT"
    snapshot_backend: str = ""
    telemetry_path: Path | None = None
    plot_path: Path | None = None
    wall_seconds: float = 0.0

    def _fraction(self, seconds: float) -> float:
        total = math.fsum(o.step_seconds for o in self.outcomes)
        return seconds / total if total > 0 else math.nan

    @property
    def check_fraction(self) -> float:
        """Host time in the Governor's checks, as a fraction of total step time."""
        return self._fraction(math.fsum(o.check_seconds for o in self.outcomes))

    @property
    def snapshot_fraction(self) -> float:
        """Host time in ``snapshot()``, as a fraction of total step time."""
        return self._fraction(math.fsum(o.snapshot_seconds for o in self.outcomes))

    @property
    def overhead_fraction(self) -> float:
        """The Governor's cost on the training path (checks + snapshots) as a fraction of total
        step time. Rollbacks are recovery, not overhead, and are reported per fault."""
        return self.check_fraction + self.snapshot_fraction

    @property
    def ok(self) -> bool:
        """Every injected fault was detected and recovered from."""
        return all(record.ok for record in self.faults)

    def failure_messages(self) -> list[str]:
        """One message per fault that failed the run, naming the fault."""
        return [message for record in self.faults if (message := record.failure_message()) is not None]


__all__ = ["DemoResult", "FaultRecord", "FaultTracker", "recovery_limit"]
