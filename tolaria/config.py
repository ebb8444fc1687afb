"""The detector settings, spelled once: a frozen, validated :class:`WatchConfig`.

The Governor builds one from its (unchanged, positional) signature and hands it down to the
:class:`tolaria.watch.Watch`, which derives the two :class:`SpikeRule` objects its detectors
use (the loss and the global gradient norm). Changing a setting at run time
(``governor.sensitivity = 4.0``) builds a new config with :func:`dataclasses.replace`, which
validates it again, and hands that down: no other place checks or stores a setting.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from tolaria.constants import (
    DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
    DEFAULT_GOVERNOR_HISTORY_WINDOW,
    DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
    DEFAULT_GOVERNOR_SENSITIVITY,
    DEFAULT_GRAD_NORM_MULTIPLIER,
    DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
    MIN_GOVERNOR_HISTORY_SAMPLES,
)


def check_number(name: str, value: object, *, minimum: float | None = None, integer: bool = False) -> float:
    """Validate a setting: a finite real (an int when ``integer``) >= ``minimum``.

    Raises TypeError/ValueError naming ``name`` and the accepted values.
    """
    kind = "an int" if integer else "a finite real number"
    bound = "" if minimum is None else f" >= {minimum:g}"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok_type:
        raise TypeError(f"{name} must be {kind}{bound}, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        raise ValueError(f"{name} must be {kind}{bound}, got {value!r}")
    return number


@dataclass(frozen=True)
class SpikeRule:
    """When one sample of a monitored series is an anomaly, and when anomalies panic.

    A sample is anomalous when it exceeds all of ``absolute_threshold``,
    ``mean + sensitivity * std`` (population std of the history) and ``multiplier * mean``;
    ``min_consecutive`` anomalies in a row panic. Nothing is judged while the history holds
    fewer than ``min_samples`` values.
    """

    sensitivity: float
    multiplier: float
    absolute_threshold: float
    min_consecutive: int
    min_samples: int = MIN_GOVERNOR_HISTORY_SAMPLES


@dataclass(frozen=True)
class WatchConfig:
    """Every setting of the Governor's detectors, validated on construction.

    Attributes:
        sensitivity: k of the ``mean + k·std`` divergence limit, for the loss and the gradient
            norm (>= 0).
        multiplier: m of the ``m·mean`` divergence limit of the loss (>= 0).
        absolute_threshold: a loss must also exceed this (nats, >= 0) to count as divergence.
        history_window: healthy samples kept per monitor (an int >= 10, the fewest the
            statistics are computed from).
        min_panics_before_rollback: consecutive anomalies (loss or gradient norm) that panic
            (an int >= 1).
        random_guess_loss: the loss of a model that guesses at random (nats, > 0); None means
            ln(10), ten classes. The lobotomy test compares the loss against it.
        grad_norm_multiplier: m of the gradient-norm detector's ``m·mean`` limit (>= 0); its own
            value because healthy gradient norms swing far wider than losses.

    Raises:
        TypeError, ValueError: a setting has the wrong type or is out of range; the message
            names it and the accepted values.
    """

    sensitivity: float = DEFAULT_GOVERNOR_SENSITIVITY
    multiplier: float = DEFAULT_GOVERNOR_LOSS_MULTIPLIER
    absolute_threshold: float = DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD
    history_window: int = DEFAULT_GOVERNOR_HISTORY_WINDOW
    min_panics_before_rollback: int = DEFAULT_MIN_PANICS_BEFORE_ROLLBACK
    random_guess_loss: float | None = None
    grad_norm_multiplier: float = DEFAULT_GRAD_NORM_MULTIPLIER

    def __post_init__(self) -> None:
        window = self.history_window
        if (
            isinstance(window, numbers.Integral)
            and not isinstance(window, bool)
            and window < (MIN_GOVERNOR_HISTORY_SAMPLES)
        ):
            # The original Governor's words (its tests match on them).
            raise ValueError(
                f"history_window ({window}) must be >= MIN_GOVERNOR_HISTORY_SAMPLES "
                f"({MIN_GOVERNOR_HISTORY_SAMPLES})"
            )
        checked = {
            "history_window": int(check_number("history_window", window, minimum=10, integer=True)),
            "min_panics_before_rollback": int(
                check_number(
                    "min_panics_before_rollback", self.min_panics_before_rollback, minimum=1, integer=True
                )
            ),  # fmt: skip
            "sensitivity": check_number("sensitivity", self.sensitivity, minimum=0.0),
            # Negative limits would flag every sample of a healthy run (all three must hold).
            "multiplier": check_number("multiplier", self.multiplier, minimum=0.0),
            "absolute_threshold": check_number("absolute_threshold", self.absolute_threshold, minimum=0.0),
            "grad_norm_multiplier": check_number(
                "grad_norm_multiplier", self.grad_norm_multiplier, minimum=0.0
            ),
        }
        guess = math.log(10) if self.random_guess_loss is None else self.random_guess_loss
        if check_number("random_guess_loss", guess) <= 0:
            raise ValueError(f"random_guess_loss must be a positive finite number or None, got {guess!r}")
        checked["random_guess_loss"] = float(guess)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def loss_rule(self) -> SpikeRule:
        """The divergence rule of the loss monitor."""
        return SpikeRule(
            self.sensitivity, self.multiplier, self.absolute_threshold, self.min_panics_before_rollback
        )

    def grad_norm_rule(self) -> SpikeRule:
        """The explosion rule of the gradient-norm monitor: no absolute floor, since norms have
        no fixed scale."""
        return SpikeRule(self.sensitivity, self.grad_norm_multiplier, 0.0, self.min_panics_before_rollback)


__all__ = ["SpikeRule", "WatchConfig", "check_number"]
