"""The escalation ladder: what a :class:`~tolaria.recovery.policy.RecoveryPolicy` does after each
rollback, and the counters loggers read (:class:`RecoveryStats`).

The ladder counts rollbacks in a sliding window of steps. Each rollback backs the learning rate
off (:class:`~tolaria.recovery.lr.LrFactor`); the ``reset_moments_after``-th and later rollbacks in
the window also clear the optimizer's moments; one more than ``max_rollbacks`` saves the verified
Last Known Good and raises :class:`~tolaria.recovery.policy.TrainingAborted`. Every rung emits
its own typed event. In shadow mode (``mode="observe"``) nothing is touched: the ladder counts and
emits one RECOVERY_OBSERVED event per panic, naming what it would have done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tolaria.recovery.lr import LrFactor
from tolaria.recovery.policy import RecoveryPolicy, TrainingAborted
from tolaria.telemetry.hub import TelemetryHub
from tolaria.telemetry.payloads import RecoveryPayload, Severity, TelemetryEvent, TelemetryEventType

#: ``StepOutcome.recovery_action`` values (joined with "+" when several rungs acted at once).
LR_BACKOFF, MOMENT_RESET, OBSERVED = "lr_backoff", "moment_reset", "observed"


@dataclass
class RecoveryStats:
    """What the policy has done so far (for loggers): rollbacks it saw, learning-rate backoffs,
    moment resets, batches recorded for a resumed run to skip, and panics seen in shadow mode."""

    rollbacks: int = 0
    backoffs: int = 0
    resets: int = 0
    skipped_batches: int = 0
    observed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RecoveryLadder:
    """Applies ``policy`` to ``optimizer`` after rollbacks. ``save_lkg(folder)`` writes the
    verified LKG into a new folder and returns its path (used when the budget runs out);
    ``hub_source`` gives the telemetry hub at emit time."""

    def __init__(
        self,
        policy: RecoveryPolicy,
        optimizer: torch.optim.Optimizer | None,
        *,
        hub_source: Callable[[], TelemetryHub],
        save_lkg: Callable[[Path], Path] | None = None,
    ) -> None:
        if not isinstance(policy, RecoveryPolicy):
            raise TypeError(f"recovery must be a tolaria.RecoveryPolicy or None, got {type(policy).__name__}")
        self.policy = policy
        self.optimizer = optimizer
        self.stats = RecoveryStats()
        self._hub_source = hub_source
        self._save_lkg = save_lkg
        self._window: deque[int] = deque()
        acts = not policy.observe_only and policy.lr_backoff < 1.0  # shadow mode touches nothing
        self.lr: LrFactor | None = LrFactor(optimizer) if acts and optimizer is not None else None

    @classmethod
    def rebind(
        cls,
        previous: RecoveryLadder | None,
        policy: RecoveryPolicy,
        optimizer: torch.optim.Optimizer | None,
        *,
        hub_source: Callable[[], TelemetryHub],
        save_lkg: Callable[[Path], Path] | None = None,
    ) -> RecoveryLadder:
        """A ladder for ``optimizer`` that keeps ``previous``'s counts and window (its hooks are
        taken off the old optimizer): the Governor's optimizer may change at a rollback."""
        ladder = cls(policy, optimizer, hub_source=hub_source, save_lkg=save_lkg)
        if previous is not None:
            previous.close()
            ladder.stats, ladder._window = previous.stats, previous._window
        return ladder

    def _emit(
        self, kind: TelemetryEventType, severity: Severity, message: str, payload: RecoveryPayload
    ) -> None:
        self._hub_source().emit(TelemetryEvent(kind, severity, message, payload))

    def _count(self, step: int) -> int:
        self._window.append(step)
        while self._window and self._window[0] <= step - self.policy.window_steps:
            self._window.popleft()
        return len(self._window)

    def after_rollback(self, step: int, reason: str) -> str:
        """Escalate after the rollback of ``step`` (caused by ``reason``); returns what was done
        (``"lr_backoff"``, ``"lr_backoff+moment_reset"``, ``"observed"``, or ``""``).

        Raises TrainingAborted when this rollback exceeds the budget (after saving the LKG when
        the policy has ``save_dir``)."""
        policy = self.policy
        count = self._count(step)
        self.stats.rollbacks += 1
        payload = RecoveryPayload(
            step=step, reason=reason, rollbacks_in_window=count, window_steps=policy.window_steps
        )
        if policy.observe_only:
            self.stats.observed += 1
            would = "abort" if count > policy.max_rollbacks else "roll back"
            self._emit(
                TelemetryEventType.RECOVERY_OBSERVED,
                Severity.WARNING,
                f"shadow mode: would {would} at step {step} ({reason}); nothing was touched",
                payload,
            )
            return OBSERVED
        if count > policy.max_rollbacks:
            path = None
            if policy.save_dir is not None and self._save_lkg is not None:
                path = self._save_lkg(Path(policy.save_dir) / f"lkg-step{step}")
            saved = RecoveryPayload(**{**asdict(payload), "path": None if path is None else str(path)})
            self._emit(
                TelemetryEventType.RECOVERY_ABORTED,
                Severity.CRITICAL,
                f"recovery budget exhausted: {count} rollbacks within {policy.window_steps} steps",
                saved,
            )
            raise TrainingAborted(reason, count, step, path, policy.window_steps)
        done = []
        if self.lr is not None:
            factor = self.lr.back_off(policy.lr_backoff)
            self.stats.backoffs += 1
            done.append(LR_BACKOFF)
            self._emit(
                TelemetryEventType.RECOVERY_LR_BACKOFF,
                Severity.WARNING,
                f"learning rate backed off to {factor:.3g}x after the rollback at step {step}",
                RecoveryPayload(**{**asdict(payload), "factor": factor}),
            )
        if count >= policy.reset_moments_after and self.optimizer is not None:
            self.optimizer.state.clear()
            self.stats.resets += 1
            done.append(MOMENT_RESET)
            self._emit(
                TelemetryEventType.RECOVERY_MOMENT_RESET,
                Severity.WARNING,
                f"optimizer moments cleared: {count} rollbacks within {policy.window_steps} steps",
                payload,
            )
        return "+".join(done)

    def healthy_step(self) -> None:
        """One healthy step: warms the learning rate back towards the scheduler's."""
        if self.lr is not None:
            self.lr.healthy_step(self.policy.lr_recovery_steps)

    @property
    def lr_factor(self) -> float:
        """The factor the learning rate is stepped with now (1.0 without a backoff)."""
        return 1.0 if self.lr is None else self.lr.factor

    def close(self) -> None:
        if self.lr is not None:
            self.lr.remove()


__all__ = ["LR_BACKOFF", "MOMENT_RESET", "OBSERVED", "RecoveryLadder", "RecoveryStats"]
