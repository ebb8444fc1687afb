"""What the Governor watches with, and what a panic says.

:class:`Watch` owns the detectors (:class:`tolaria.vitals.LossMonitor` for the loss, a
:class:`tolaria.vitals.SpikeDetector` for the global gradient norm) and the one
:class:`Panic` awaiting a rollback. It judges a loss (:meth:`Watch.observe_loss`) or a health
report over parameters and gradients (:meth:`Watch.observe_tensors`); the Governor decides what
to do with the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tolaria.constants import (
    DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
    DEFAULT_GOVERNOR_HISTORY_WINDOW,
    DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
    DEFAULT_GOVERNOR_SENSITIVITY,
    DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
)
from tolaria.health import HealthReport
from tolaria.vitals import (
    DEFAULT_GRAD_NORM_MULTIPLIER,
    REASON_GRAD_EXPLOSION,
    REASON_NONFINITE_GRADS,
    REASON_NONFINITE_PARAMS,
    LossMonitor,
    SpikeDetector,
    check_number,
)


@dataclass(frozen=True)
class Panic:
    """Why the Governor panicked. ``loss``/``threshold`` are NaN where they do not apply (a
    health panic has no loss); ``first_bad`` names the first sick tensor of a health panic;
    ``grad_norm`` is the global gradient L2 norm of a gradient panic (NaN otherwise); ``step``
    labels the observed step whose deferred verdict panicked (None for a blocking check)."""

    reason: str
    loss: float
    threshold: float
    consecutive: int
    first_bad: str | None = None
    grad_norm: float = math.nan
    step: int | None = None


def gradient_norm(report: HealthReport, n_params: int) -> float:
    """The global L2 norm of a report's gradients (its entries after the first ``n_params``);
    NaN when it has none."""
    norms = report.norms[n_params:]
    return math.sqrt(math.fsum(n * n for n in norms)) if norms else math.nan


class Watch:
    """All the Governor detects with: the loss monitor, a gradient-norm detector (its own
    history, the same sensitivity and consecutive rule, its own ``grad_norm_multiplier``, no
    absolute floor because norms have no fixed scale), and the last panic, which waits for a
    rollback to report it."""

    #: Run-time settings: name → (attribute of SpikeDetector, monitors it applies to).
    SETTINGS = {
        "sensitivity": ("sensitivity", ("loss", "grad")),
        "multiplier": ("multiplier", ("loss",)),
        "absolute_threshold": ("absolute_threshold", ("loss",)),
        "min_panics_before_rollback": ("min_consecutive", ("loss", "grad")),
        "grad_norm_multiplier": ("multiplier", ("grad",)),
    }

    def __init__(
        self,
        *,
        sensitivity: float = DEFAULT_GOVERNOR_SENSITIVITY,
        multiplier: float = DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
        absolute_threshold: float = DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
        history_window: int = DEFAULT_GOVERNOR_HISTORY_WINDOW,
        min_panics_before_rollback: int = DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
        random_guess_loss: float | None = None,
        grad_norm_multiplier: float = DEFAULT_GRAD_NORM_MULTIPLIER,
    ) -> None:
        self.loss = LossMonitor(
            sensitivity=sensitivity,
            multiplier=multiplier,
            absolute_threshold=absolute_threshold,
            history_window=history_window,
            min_panics_before_rollback=min_panics_before_rollback,
            random_guess_loss=random_guess_loss,
        )
        self.grad_norms = SpikeDetector(
            history_window=history_window,
            sensitivity=sensitivity,
            multiplier=check_number("grad_norm_multiplier", grad_norm_multiplier, minimum=0.0),
            absolute_threshold=0.0,
            min_consecutive=min_panics_before_rollback,
        )
        self.pending: Panic | None = None

    def _detectors(self, name: str) -> tuple[str, list[SpikeDetector]]:
        attr, monitors = self.SETTINGS[name]
        return attr, [self.loss.spikes if m == "loss" else self.grad_norms for m in monitors]

    def setting(self, name: str) -> float | int:
        attr, detectors = self._detectors(name)
        return getattr(detectors[0], attr)  # type: ignore[no-any-return]

    def configure(self, name: str, value: object) -> None:
        """Change one of ``SETTINGS`` at run time; validated like the constructor argument
        (TypeError/ValueError naming ``name``)."""
        attr, detectors = self._detectors(name)
        integer = attr == "min_consecutive"
        low = 1 if integer else (0.0 if attr == "sensitivity" or name == "grad_norm_multiplier" else None)
        number = check_number(name, value, minimum=low, integer=integer)
        for detector in detectors:
            setattr(detector, attr, int(number) if integer else number)

    @property
    def anomaly_streak(self) -> int:
        """The longest running anomaly streak of any monitor (loss or gradient norm); > 0 while
        one is building, 0 after a normal sample of each."""
        return max(self.loss.consecutive_panics, self.grad_norms.consecutive)

    def observe_loss(self, loss: object) -> Panic | None:
        """Judge one loss (see :class:`LossMonitor`); a panic is also kept as ``pending``."""
        signs = self.loss.check(loss)
        if signs.reason is None:
            return None
        return self._keep(Panic(signs.reason, signs.loss, signs.threshold, signs.consecutive_panics))

    def observe_tensors(self, report: HealthReport, n_params: int) -> Panic | None:
        """Judge a report over parameters (its first ``n_params`` entries) then gradients.

        Non-finite parameters win over non-finite gradients, which win over a gradient-norm
        explosion. Only a step with finite gradients feeds the norm history, so it stays
        NaN-free and a sick step is not also counted as a norm anomaly.
        """
        names, nonfinite = report.names, report.nonfinite
        norms = report.norms[n_params:]
        grad_norm = gradient_norm(report, n_params)
        if report.first_bad is not None:  # a healthy step skips both per-tensor walks
            bad_param = next((names[i] for i in range(n_params) if nonfinite[i]), None)
            if bad_param is not None:
                return self._keep(Panic(REASON_NONFINITE_PARAMS, math.nan, math.nan, 1, bad_param, grad_norm))
            bad_grad = next((names[i] for i in range(n_params, len(names)) if nonfinite[i]), None)
            if bad_grad is not None:
                return self._keep(Panic(REASON_NONFINITE_GRADS, math.nan, math.nan, 1, bad_grad, grad_norm))
        if not norms:
            return None
        verdict = self.grad_norms.observe(grad_norm)
        if not verdict.panic:
            return None
        return self._keep(
            Panic(REASON_GRAD_EXPLOSION, math.nan, verdict.threshold, verdict.consecutive, None, grad_norm)
        )

    def _keep(self, panic: Panic) -> Panic:
        self.pending = panic
        return panic

    def panic_for_rollback(self, manual_reason: str) -> tuple[Panic, bool]:
        """The pending panic (and True), or a stand-in for a rollback no panic preceded: reason
        ``manual_reason``, NaN loss, the current loss threshold (and False)."""
        if self.pending is not None:
            return self.pending, True
        return Panic(
            manual_reason, math.nan, self.loss.spikes.threshold(), self.loss.consecutive_panics
        ), False

    def clear_panic(self) -> None:
        """After a rollback: no pending panic, both anomaly runs back to 0 (histories kept)."""
        self.pending = None
        self.loss.consecutive_panics = 0
        self.grad_norms.consecutive = 0

    def reset(self) -> None:
        """A new episode: empty histories and no panic."""
        self.loss.reset()
        self.grad_norms.reset()
        self.pending = None


__all__ = ["Panic", "Watch", "gradient_norm"]
