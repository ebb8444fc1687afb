"""What happens after a rollback so that the run does not walk back into the same fault.

A :class:`RecoveryPolicy` is one frozen, validated object; :class:`tolaria.recovery.ladder.RecoveryLadder`
applies it after every rollback. The rungs, in order of escalation:

1. **learning-rate backoff** — every rollback multiplies the learning rate the optimizer steps
   with by ``lr_backoff`` (factors of rollbacks inside the recovery window multiply), then warms
   it back to the scheduler's value over ``lr_recovery_steps`` healthy steps (geometrically);
2. **moment reset** — ``reset_moments_after`` rollbacks inside ``window_steps`` steps clear the
   optimizer's per-parameter state (Adam's ``exp_avg``/``exp_avg_sq`` and ``step``, SGD's
   momentum), since a poisoned second moment is one way a spike recurs;
3. **budget** — more than ``max_rollbacks`` rollbacks inside ``window_steps`` raise
   :class:`TrainingAborted` instead of rolling back forever, after saving the verified Last Known
   Good under ``save_dir`` when one is given.

``mode="observe"`` (shadow mode) detects, emits the events and counts, but never touches the
model or the optimizer: a team calibrates thresholds on a live run first.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

RECOVERY_MODES = ("act", "observe")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"RecoveryPolicy.{name} must be an int >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class RecoveryPolicy:
    """How the Governor and :class:`tolaria.GuardedStep` escape a recurring fault.

    Attributes:
        lr_backoff: factor applied to the learning rate after a rollback, in (0, 1]; 1.0 turns
            the backoff off (default 0.5).
        lr_recovery_steps: healthy steps over which the factor warms back to 1 (geometrically:
            halfway there, it is the square root of the backoff), an int >= 0; 0 restores the
            full learning rate at the next healthy step (default 100).
        reset_moments_after: rollbacks inside ``window_steps`` that clear the optimizer's moments,
            an int >= 1 (default 2: the second rollback in a window resets them).
        max_rollbacks: rollbacks allowed inside ``window_steps``; one more raises
            :class:`TrainingAborted`, an int >= 1 (default 5).
        window_steps: the sliding window (in steps, rolled-back attempts included) the counts
            above are taken over, an int >= 1 (default 200).
        mode: ``"act"`` (default) or ``"observe"`` (shadow mode: detect and report only).
        save_dir: where :class:`TrainingAborted` saves the verified Last Known Good (a folder;
            None: nothing is saved).

    Raises:
        ValueError: a field out of range; the message names the field and the accepted range.
    """

    lr_backoff: float = 0.5
    lr_recovery_steps: int = 100
    reset_moments_after: int = 2
    max_rollbacks: int = 5
    window_steps: int = 200
    mode: str = "act"
    save_dir: str | Path | None = None

    def __post_init__(self) -> None:
        backoff = self.lr_backoff
        if (
            isinstance(backoff, bool)
            or not isinstance(backoff, numbers.Real)
            or not math.isfinite(float(backoff))
            or not 0.0 < float(backoff) <= 1.0
        ):
            raise ValueError(f"RecoveryPolicy.lr_backoff must be a number in (0, 1], got {backoff!r}")
        object.__setattr__(self, "lr_backoff", float(backoff))
        for name, low in (
            ("lr_recovery_steps", 0),
            ("reset_moments_after", 1),
            ("max_rollbacks", 1),
            ("window_steps", 1),
        ):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), low))
        if self.mode not in RECOVERY_MODES:
            raise ValueError(f"RecoveryPolicy.mode must be one of {RECOVERY_MODES}, got {self.mode!r}")
        if self.save_dir is not None:
            if not isinstance(self.save_dir, (str, Path)) or not str(self.save_dir):
                raise ValueError(
                    f"RecoveryPolicy.save_dir must be a folder path or None, got {self.save_dir!r}"
                )
            object.__setattr__(self, "save_dir", Path(self.save_dir))

    @property
    def observe_only(self) -> bool:
        """Whether this is shadow mode (nothing is touched)."""
        return self.mode == "observe"


class TrainingAborted(RuntimeError):
    """The rollback budget of a :class:`RecoveryPolicy` ran out.

    Attributes: ``reason`` (the panic reason of the last rollback), ``rollbacks`` (how many
    happened inside the window), ``step`` (the step that exceeded the budget) and ``path`` (where
    the verified Last Known Good was saved, None when the policy has no ``save_dir``).
    """

    def __init__(self, reason: str, rollbacks: int, step: int, path: Path | None, window_steps: int) -> None:
        saved = f"; the verified Last Known Good is saved at {path}" if path is not None else ""
        super().__init__(
            f"training aborted at step {step}: {rollbacks} rollbacks within {window_steps} steps "
            f"(last: {reason}) exceed the recovery budget{saved}"
        )
        self.reason = reason
        self.rollbacks = rollbacks
        self.step = step
        self.path = path


__all__ = ["RECOVERY_MODES", "RecoveryPolicy", "TrainingAborted"]
