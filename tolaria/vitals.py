"""Vital signs: is the loss (or any scalar the trainer watches) telling us training is failing?

Three failures are recognised, in this order (docs/architecture.md, "Vital signs"):

1. A non-finite loss panics at once (``governor_nan``); it never enters the history and leaves
   the divergence run's count as it was (so does a lobotomy).
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

from tolaria.config import SpikeRule, WatchConfig
from tolaria.constants import DEFAULT_GOVERNOR_HISTORY_WINDOW

REASON_NAN = "governor_nan"
REASON_LOBOTOMY = "governor_lobotomy"
REASON_DIVERGENCE = "governor_divergence"
REASON_NONFINITE_PARAMS = "governor_nonfinite_params"
REASON_NONFINITE_GRADS = "governor_nonfinite_grads"
REASON_GRAD_EXPLOSION = "governor_grad_explosion"
#: Not a detector's verdict: a rollback was interrupted half-way, so the weights are a mix of the
#: LKG and what came before; every check panics with it until a rollback completes the restore.
REASON_RESTORE_INCOMPLETE = "governor_restore_incomplete"

#: A lobotomy needs the history mean below this fraction of the random-guess loss ...
LOBOTOMY_MEAN_FRACTION = 0.6
#: ... and the new loss within this fraction of the random-guess loss.
LOBOTOMY_TOLERANCE_FRACTION = 0.065


def coerce_loss(loss: object) -> float:
    """Return ``loss`` as a Python float.

    Accepts a real Python/NumPy number or a one-element real tensor on any device (a GPU tensor
    costs one device→host read). Raises TypeError naming the type (and shape) otherwise; ``bool``
    is rejected because a boolean "loss" is always a bug. Raises ValueError for a number beyond
    the float range (``10**400``: no float holds it, and calling it infinite would invent a
    value) and for a tensor without data (the meta device).
    """
    if isinstance(loss, torch.Tensor):
        return float(check_loss_tensor(loss).item())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        try:
            return float(loss)
        except OverflowError:
            kind = type(loss).__name__
            article = "an" if kind[:1] in "aeiou" else "a"
            raise ValueError(
                f"loss must fit a Python float (|loss| <= 1.8e308), got {article} {kind} beyond that"
            ) from None
    raise TypeError(f"loss must be a Python number or a one-element tensor, got {type(loss).__name__}")


def check_loss_tensor(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` detached as a 0-d tensor (no device read); TypeError unless it is a one-element
    real tensor, ValueError when it holds no data (the meta device)."""
    if loss.numel() != 1 or loss.is_complex() or loss.dtype == torch.bool:
        raise TypeError(
            "loss must be a Python number or a one-element real tensor, got a tensor of "
            f"shape {tuple(loss.shape)} and dtype {loss.dtype}"
        )
    if loss.is_meta:
        raise ValueError(
            "loss is a tensor on the meta device, which holds no value; compute the loss on a real "
            "device (a model on meta must be materialized first)"
        )
    return loss.detach().reshape(())


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
    """A bounded history of finite samples plus the consecutive-anomaly rule (:class:`SpikeRule`).

    While the history holds fewer than ``rule.min_samples`` values every finite sample is
    appended and nothing is anomalous. NaN samples are ignored entirely; ``+inf`` is an anomaly;
    neither is ever stored. ``rule`` may be replaced at run time (settings change); the history
    is kept.
    """

    def __init__(self, rule: SpikeRule, history_window: int = DEFAULT_GOVERNOR_HISTORY_WINDOW) -> None:
        self.rule = rule
        self.history: deque[float] = deque(maxlen=int(history_window))
        self.consecutive = 0

    def mean(self) -> float:
        """Mean of the history; NaN when empty."""
        return math.fsum(self.history) / len(self.history) if self.history else math.nan

    def std(self) -> float:
        """Population standard deviation of the history; NaN when empty."""
        return self._std(self.mean()) if self.history else math.nan

    def _std(self, mean: float) -> float:
        history = self.history
        return math.sqrt(math.fsum([(x - mean) ** 2 for x in history]) / len(history))

    def threshold(self) -> float:
        """``mean + sensitivity * std``; NaN when the history is empty."""
        return self.limits()[1]

    def limits(self) -> tuple[float, float]:
        """``(mean, threshold)`` of the history in one go (the same values as :meth:`mean` and
        :meth:`threshold`; NaNs when it is empty): a judgement reads the history once."""
        if not self.history:
            return math.nan, math.nan
        mean = self.mean()
        return mean, mean + self.rule.sensitivity * self._std(mean)

    def is_anomaly(self, value: float) -> bool:
        """Whether ``value`` breaks all three limits against the current history (no state change)."""
        return self._anomalous(value, self.limits())

    def _anomalous(self, value: float, limits: tuple[float, float]) -> bool:
        rule = self.rule
        if len(self.history) < rule.min_samples or math.isnan(value):
            return False
        mean, threshold = limits
        return value > rule.absolute_threshold and value > threshold and value > rule.multiplier * mean

    def observe(self, value: float, limits: tuple[float, float] | None = None) -> SpikeVerdict:
        """Feed one sample; returns whether it was anomalous and whether the run of anomalies
        reached ``rule.min_consecutive`` (panic). A normal sample is appended and clears the run.
        ``limits``: this history's :meth:`limits`, when the caller has just computed them."""
        if limits is None:
            limits = self.limits()
        threshold = limits[1]
        warming_up = len(self.history) < self.rule.min_samples
        needed = self.rule.min_consecutive
        if math.isnan(value):
            return SpikeVerdict(False, False, warming_up, threshold, self.consecutive)
        if warming_up:
            if math.isfinite(value):
                self.history.append(value)
                self.consecutive = 0
                return SpikeVerdict(False, False, True, threshold, 0)
            # +inf while warming up cannot be judged statistically but is never normal either.
            self.consecutive += 1
            return SpikeVerdict(True, self.consecutive >= needed, True, threshold, self.consecutive)
        if self._anomalous(value, limits):
            self.consecutive += 1
            return SpikeVerdict(True, self.consecutive >= needed, False, threshold, self.consecutive)
        self.history.append(value)
        self.consecutive = 0
        return SpikeVerdict(False, False, False, threshold, 0)

    def reset(self) -> None:
        self.history.clear()
        self.consecutive = 0


@dataclass(frozen=True)
class VitalSigns:
    """The verdict on one loss: ``panic`` with its ``reason`` (None when healthy), the loss as a
    float, the divergence ``threshold`` in effect, and the consecutive-anomaly count;
    ``anomaly``: the sample broke the divergence limits (panicking or not yet); ``warming_up``:
    the history was still too short to judge it."""

    panic: bool
    reason: str | None
    loss: float
    threshold: float
    consecutive_panics: int
    anomaly: bool = False
    warming_up: bool = False


class LossMonitor:
    """The loss watchdog of the "Vital signs" contract (docs/architecture.md; pure Python, no
    device work except reading a tensor loss). Units: losses in nats. ``config`` holds the
    settings (default: the original Governor's); :meth:`configure` hands a new one down."""

    def __init__(self, config: WatchConfig | None = None) -> None:
        config = WatchConfig() if config is None else config
        self.spikes = SpikeDetector(config.loss_rule(), config.history_window)
        self.random_guess_loss = float(config.random_guess_loss)  # type: ignore[arg-type]

    def configure(self, config: WatchConfig) -> None:
        """Apply changed settings; the history is kept."""
        self.spikes.rule = config.loss_rule()
        self.random_guess_loss = float(config.random_guess_loss)  # type: ignore[arg-type]

    @property
    def history(self) -> deque[float]:
        return self.spikes.history

    @property
    def consecutive_panics(self) -> int:
        return self.spikes.consecutive

    @consecutive_panics.setter
    def consecutive_panics(self, value: int) -> None:
        self.spikes.consecutive = int(value)

    def is_lobotomy(self, loss: float, mean: float | None = None) -> bool:
        """A sudden fall back to the random-guess loss from a history well below it. ``mean``:
        the history's mean, when the caller has just computed it."""
        if len(self.history) < self.spikes.rule.min_samples:
            return False
        guess = self.random_guess_loss
        mean = self.spikes.mean() if mean is None else mean
        near_guess = abs(loss - guess) < LOBOTOMY_TOLERANCE_FRACTION * guess
        return mean < LOBOTOMY_MEAN_FRACTION * guess and near_guess

    def check(self, loss: object) -> VitalSigns:
        """Judge one loss (see the module docstring for the rules).

        Raises TypeError for anything but a real number or a one-element tensor.
        """
        value = coerce_loss(loss)
        limits = self.spikes.limits()
        threshold = limits[1]
        if not math.isfinite(value) or self.is_lobotomy(value, limits[0]):
            # Immediate panics never touch the history, nor the divergence run (as the original).
            immediate = REASON_NAN if not math.isfinite(value) else REASON_LOBOTOMY
            return VitalSigns(True, immediate, value, threshold, self.spikes.consecutive)
        verdict = self.spikes.observe(value, limits)
        reason = REASON_DIVERGENCE if verdict.panic else None
        return VitalSigns(
            verdict.panic, reason, value, threshold, verdict.consecutive, verdict.anomaly, verdict.warming_up
        )

    def reset(self) -> None:
        self.spikes.reset()


__all__ = [
    "REASON_DIVERGENCE",
    "REASON_GRAD_EXPLOSION",
    "REASON_LOBOTOMY",
    "REASON_NAN",
    "REASON_NONFINITE_GRADS",
    "REASON_NONFINITE_PARAMS",
    "REASON_RESTORE_INCOMPLETE",
    "LossMonitor",
    "SpikeDetector",
    "SpikeVerdict",
    "VitalSigns",
    "check_loss_tensor",
    "coerce_loss",
]
