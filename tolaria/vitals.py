"""Vital signs: is the loss (or any scalar the trainer watches) telling us training is failing?

Three failures are recognised, in this order (see DESIGN.md "Vital signs"):

1. A non-finite loss panics at once (``governor_nan``); it never enters the history.
2. A *lobotomy*: with at least ``MIN_GOVERNOR_HISTORY_SAMPLES`` of history whose mean is well
   below the random-guess loss, a loss that lands right on the random-guess value means the
   model forgot everything at once (``governor_lobotomy``).
3. *Divergence*: a sample that is at once above ``absolute_threshold``, above
   ``mean + sensitivity * std`` and above ``multiplier * mean`` of the recent history is an
   anomaly; ``min_panics_before_rollback`` anomalies in a row panic (``governor_divergence``).
   Anomalies are never added to the history, so a spike cannot drag the statistics up after it.

:class:`SpikeDetector` is the window statistics plus the consecutive-anomaly rule, written once
and shared: the loss monitor uses it, and so does the Governor's gradient-norm monitor, with its
own multiplier (:data:`DEFAULT_GRAD_NORM_MULTIPLIER`) because healthy gradient norms swing far
wider than healthy losses.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass

import torch

from tolaria.constants import (
    DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
    DEFAULT_GOVERNOR_HISTORY_WINDOW,
    DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
    DEFAULT_GOVERNOR_SENSITIVITY,
    DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
    MIN_GOVERNOR_HISTORY_SAMPLES,
)

REASON_NAN = "governor_nan"
REASON_LOBOTOMY = "governor_lobotomy"
REASON_DIVERGENCE = "governor_divergence"
REASON_NONFINITE_PARAMS = "governor_nonfinite_params"
REASON_NONFINITE_GRADS = "governor_nonfinite_grads"
REASON_GRAD_EXPLOSION = "governor_grad_explosion"

#: A lobotomy needs the history mean below this fraction of the random-guess loss ...
LOBOTOMY_MEAN_FRACTION = 0.6
#: ... and the new loss within this fraction of the random-guess loss.
LOBOTOMY_TOLERANCE_FRACTION = 0.065
#: The "m·mean" of the gradient-norm detector: an explosion must be an order of magnitude above
#: the recent mean. Healthy Adam runs swing well past the loss multiplier (3): the fault-free
#: tinystories demo was rolled back twice for runs of three norms at 3-8x the mean, each also
#: past mean + 6·std of a calm history; the demo's real blow-ups measure ~240x and ~20000x.
#: Adam bounds the per-coordinate update, so a short swing of a few x cannot do the damage a
#: rollback is for.
DEFAULT_GRAD_NORM_MULTIPLIER = 10.0


def coerce_loss(loss: object) -> float:
    """Return ``loss`` as a Python float.

    Accepts a real Python/NumPy number or a one-element real tensor on any device (a GPU tensor
    costs one device→host read). Raises TypeError naming the type (and shape) otherwise; ``bool``
    is rejected because a boolean "loss" is always a bug.
    """
    if isinstance(loss, torch.Tensor):
        return float(check_loss_tensor(loss).item())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"loss must be a Python number or a one-element tensor, got {type(loss).__name__}")


def check_loss_tensor(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` detached as a 0-d tensor (no device read); TypeError unless it is a one-element
    real tensor."""
    if loss.numel() != 1 or loss.is_complex() or loss.dtype == torch.bool:
        raise TypeError(
            "loss must be a Python number or a one-element real tensor, got a tensor of "
            f"shape {tuple(loss.shape)} and dtype {loss.dtype}"
        )
    return loss.detach().reshape(())


def check_number(name: str, value: object, *, minimum: float | None = None, integer: bool = False) -> float:
    """Validate a constructor argument: a finite real (an int when ``integer``) >= ``minimum``.

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
class SpikeVerdict:
    """The outcome of one :meth:`SpikeDetector.observe`. ``threshold`` is mean + sensitivity·std
    of the history before this sample (NaN while the history is empty)."""

    anomaly: bool
    panic: bool
    warming_up: bool
    threshold: float
    consecutive: int


class SpikeDetector:
    """A bounded history of finite samples plus the consecutive-anomaly rule.

    A sample is anomalous when it exceeds all of ``absolute_threshold``,
    ``mean + sensitivity * std`` (population std) and ``multiplier * mean``. While the history
    holds fewer than ``min_samples`` values every finite sample is appended and nothing is
    anomalous. NaN samples are ignored entirely; ``+inf`` is an anomaly; neither is ever stored.
    """

    def __init__(
        self,
        *,
        history_window: int = DEFAULT_GOVERNOR_HISTORY_WINDOW,
        sensitivity: float = DEFAULT_GOVERNOR_SENSITIVITY,
        multiplier: float = DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
        absolute_threshold: float = 0.0,
        min_consecutive: int = DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
        min_samples: int = MIN_GOVERNOR_HISTORY_SAMPLES,
    ) -> None:
        check_number("history_window", history_window, minimum=min_samples, integer=True)
        check_number("min_panics_before_rollback", min_consecutive, minimum=1, integer=True)
        self.sensitivity = check_number("sensitivity", sensitivity, minimum=0.0)
        self.multiplier = check_number("multiplier", multiplier)
        self.absolute_threshold = check_number("absolute_threshold", absolute_threshold)
        self.min_consecutive = int(min_consecutive)
        self.min_samples = int(min_samples)
        self.history: deque[float] = deque(maxlen=int(history_window))
        self.consecutive = 0

    def mean(self) -> float:
        """Mean of the history; NaN when empty."""
        return math.fsum(self.history) / len(self.history) if self.history else math.nan

    def std(self) -> float:
        """Population standard deviation of the history; NaN when empty."""
        if not self.history:
            return math.nan
        mean = self.mean()
        return math.sqrt(math.fsum((x - mean) ** 2 for x in self.history) / len(self.history))

    def threshold(self) -> float:
        """``mean + sensitivity * std``; NaN when the history is empty."""
        return self.mean() + self.sensitivity * self.std()

    def is_anomaly(self, value: float) -> bool:
        """Whether ``value`` breaks all three limits against the current history (no state change)."""
        if len(self.history) < self.min_samples or math.isnan(value):
            return False
        mean = self.mean()
        return value > self.absolute_threshold and value > self.threshold() and value > self.multiplier * mean

    def observe(self, value: float) -> SpikeVerdict:
        """Feed one sample; returns whether it was anomalous and whether the run of anomalies
        reached ``min_consecutive`` (panic). A normal sample is appended and clears the run."""
        threshold = self.threshold()
        if math.isnan(value):
            return SpikeVerdict(
                False, False, len(self.history) < self.min_samples, threshold, self.consecutive
            )
        if len(self.history) < self.min_samples:
            if math.isfinite(value):
                self.history.append(value)
                self.consecutive = 0
                return SpikeVerdict(False, False, True, threshold, 0)
            # +inf while warming up cannot be judged statistically but is never normal either.
            self.consecutive += 1
            return SpikeVerdict(
                True, self.consecutive >= self.min_consecutive, True, threshold, self.consecutive
            )
        if self.is_anomaly(value):
            self.consecutive += 1
            return SpikeVerdict(
                True, self.consecutive >= self.min_consecutive, False, threshold, self.consecutive
            )
        self.history.append(value)
        self.consecutive = 0
        return SpikeVerdict(False, False, False, threshold, 0)

    def reset(self) -> None:
        self.history.clear()
        self.consecutive = 0


@dataclass(frozen=True)
class VitalSigns:
    """The verdict on one loss: ``panic`` with its ``reason`` (None when healthy), the loss as a
    float, the divergence ``threshold`` in effect, and the consecutive-anomaly count."""

    panic: bool
    reason: str | None
    loss: float
    threshold: float
    consecutive_panics: int


class LossMonitor:
    """The loss watchdog of DESIGN.md "Vital signs" (pure Python, no device work except reading a
    tensor loss). Units: losses in nats; ``random_guess_loss`` defaults to ln(10)."""

    def __init__(
        self,
        *,
        sensitivity: float = DEFAULT_GOVERNOR_SENSITIVITY,
        multiplier: float = DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
        absolute_threshold: float = DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
        history_window: int = DEFAULT_GOVERNOR_HISTORY_WINDOW,
        min_panics_before_rollback: int = DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
        random_guess_loss: float | None = None,
    ) -> None:
        self.spikes = SpikeDetector(
            history_window=history_window,
            sensitivity=sensitivity,
            multiplier=multiplier,
            absolute_threshold=absolute_threshold,
            min_consecutive=min_panics_before_rollback,
        )
        guess = math.log(10) if random_guess_loss is None else random_guess_loss
        if check_number("random_guess_loss", guess) <= 0:
            raise ValueError(f"random_guess_loss must be a positive finite number or None, got {guess!r}")
        self.random_guess_loss = float(guess)

    @property
    def history(self) -> deque[float]:
        return self.spikes.history

    @property
    def consecutive_panics(self) -> int:
        return self.spikes.consecutive

    @consecutive_panics.setter
    def consecutive_panics(self, value: int) -> None:
        self.spikes.consecutive = int(value)

    def is_lobotomy(self, loss: float) -> bool:
        """A sudden fall back to the random-guess loss from a history well below it."""
        if len(self.history) < self.spikes.min_samples:
            return False
        guess = self.random_guess_loss
        return (
            self.spikes.mean() < LOBOTOMY_MEAN_FRACTION * guess
            and abs(loss - guess) < LOBOTOMY_TOLERANCE_FRACTION * guess
        )

    def check(self, loss: object) -> VitalSigns:
        """Judge one loss (see the module docstring for the rules).

        Raises TypeError for anything but a real number or a one-element tensor.
        """
        value = coerce_loss(loss)
        threshold = self.spikes.threshold()
        if not math.isfinite(value) or self.is_lobotomy(value):
            # Immediate panics count as one more anomaly in the run and never touch the history.
            self.spikes.consecutive += 1
            immediate = REASON_NAN if not math.isfinite(value) else REASON_LOBOTOMY
            return VitalSigns(True, immediate, value, threshold, self.spikes.consecutive)
        verdict = self.spikes.observe(value)
        reason = REASON_DIVERGENCE if verdict.panic else None
        return VitalSigns(verdict.panic, reason, value, threshold, verdict.consecutive)

    def reset(self) -> None:
        self.spikes.reset()


__all__ = [
    "REASON_DIVERGENCE",
    "REASON_GRAD_EXPLOSION",
    "REASON_LOBOTOMY",
    "REASON_NAN",
    "REASON_NONFINITE_GRADS",
    "REASON_NONFINITE_PARAMS",
    "DEFAULT_GRAD_NORM_MULTIPLIER",
    "LossMonitor",
    "SpikeDetector",
    "SpikeVerdict",
    "VitalSigns",
    "check_loss_tensor",
    "check_number",
    "coerce_loss",
]
