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

from tolaria.config import WatchConfig
from tolaria.health import HealthReport
from tolaria.health.report import root_of_sum
from tolaria.vitals import (
    REASON_DIVERGENCE,
    REASON_GRAD_EXPLOSION,
    REASON_LOBOTOMY,
    REASON_NAN,
    REASON_NONFINITE_GRADS,
    REASON_NONFINITE_PARAMS,
    LossMonitor,
    SpikeDetector,
)

#: Panics judged on the loss: their loss is the original Governor's ``_panic_loss``.
_LOSS_REASONS = frozenset({REASON_NAN, REASON_LOBOTOMY, REASON_DIVERGENCE})


@dataclass(frozen=True)
class Panic:
    """Why the Governor panicked. ``loss``/``threshold`` are NaN where they do not apply (a
    health panic carries the loss of its step when that step's loss was judged first, NaN
    otherwise); ``first_bad`` names the first sick tensor of a health panic;
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
    NaN when it has none. From the per-tensor sums of squares when the report has them."""
    if len(report.norms) <= n_params:
        return math.nan
    if report.squares is not None:
        return root_of_sum(report.squares[n_params:])
    return root_of_sum([n * n for n in report.norms[n_params:]])


class Watch:
    """All the Governor detects with: the loss monitor, a gradient-norm detector (its own
    history, the same sensitivity and consecutive rule, its own ``grad_norm_multiplier``, no
    absolute floor because norms have no fixed scale), and the last panic, which waits for a
    rollback to report it. Only this class writes the panic state.

    Beside ``pending`` it keeps the original Governor's panic state, which esper-lite's trainer
    reads and its tests write (``_panic_reason``, ``_panic_loss``, ``_pending_panic`` on the
    Governor): ``panic_reason`` and ``panic_loss`` of the latest panic or divergence anomaly,
    and ``anomaly_pending`` while a divergence run is building. A rollback reports them."""

    def __init__(self, config: WatchConfig | None = None) -> None:
        self.config = WatchConfig() if config is None else config
        self.loss = LossMonitor(self.config)
        self.grad_norms = SpikeDetector(self.config.grad_norm_rule(), self.config.history_window)
        self.pending: Panic | None = None
        self.panic_reason: str | None = None
        self.panic_loss: float | None = None
        self.anomaly_pending = False
        # The loss of the step being judged, for the report of a health panic of that step.
        self._step_loss = math.nan

    def configure(self, config: WatchConfig) -> None:
        """Hand changed settings (already validated by :class:`WatchConfig`) to both monitors;
        histories and anomaly runs are kept. ``history_window`` cannot change at run time."""
        if config.history_window != self.config.history_window:
            raise ValueError(
                f"history_window is fixed once the Governor is built ({self.config.history_window}); "
                f"got {config.history_window}"
            )
        self.config = config
        self.loss.configure(config)
        self.grad_norms.rule = config.grad_norm_rule()

    @property
    def anomaly_streak(self) -> int:
        """The longest running anomaly streak of any monitor (loss or gradient norm); > 0 while
        one is building, 0 after a normal sample of each."""
        return max(self.loss.consecutive_panics, self.grad_norms.consecutive)

    def observe_loss(self, loss: object, step: int | None = None) -> Panic | None:
        """Judge one loss (see :class:`LossMonitor`); a panic is also kept as ``pending``.
        ``step`` labels a deferred verdict's step (None for a blocking check)."""
        signs = self.loss.check(loss)
        self._step_loss = signs.loss
        if signs.reason in (REASON_NAN, REASON_LOBOTOMY):
            self.set_panic_state(reason=signs.reason, loss=signs.loss, anomaly_pending=False)
        elif signs.anomaly:
            self.set_panic_state(reason=REASON_DIVERGENCE, loss=signs.loss, anomaly_pending=True)
        elif signs.warming_up:
            self.panic_reason = None  # the original clears only the reason while warming up
        else:
            self.set_panic_state(reason=None, loss=None, anomaly_pending=False)
        if signs.reason is None:
            return None
        return self.keep(
            Panic(reason=signs.reason, loss=signs.loss, threshold=signs.threshold,
                  consecutive=signs.consecutive_panics, step=step)
        )  # fmt: skip

    def observe_tensors(self, report: HealthReport, n_params: int, step: int | None = None,
                        grad_norm: float | None = None) -> Panic | None:  # fmt: skip
        """Judge a report over parameters (its first ``n_params`` entries) then gradients;
        ``step`` as for :meth:`observe_loss`; ``grad_norm``: :func:`gradient_norm` of the
        report, when the caller has just computed it.

        Non-finite parameters win over non-finite gradients, which win over a gradient-norm
        explosion. Only a step with finite gradients feeds the norm history, so it stays
        NaN-free and a sick step is not also counted as a norm anomaly.
        """
        names, nonfinite = report.names, report.nonfinite
        norms = report.norms[n_params:]
        step_loss, self._step_loss = self._step_loss, math.nan
        if grad_norm is None:
            grad_norm = gradient_norm(report, n_params)
        if report.first_bad is not None:  # a healthy step skips both per-tensor walks
            bad_param = next((names[i] for i in range(n_params) if nonfinite[i]), None)
            bad_grad = next((names[i] for i in range(n_params, len(names)) if nonfinite[i]), None)
            reason = REASON_NONFINITE_PARAMS if bad_param is not None else REASON_NONFINITE_GRADS
            first_bad = bad_param if bad_param is not None else bad_grad
            if first_bad is not None:
                return self.keep(
                    Panic(reason=reason, loss=step_loss, threshold=math.nan, consecutive=1,
                          first_bad=first_bad, grad_norm=grad_norm, step=step)
                )  # fmt: skip
        if not norms:
            return None
        verdict = self.grad_norms.observe(grad_norm)
        if not verdict.panic:
            return None
        return self.keep(
            Panic(reason=REASON_GRAD_EXPLOSION, loss=step_loss, threshold=verdict.threshold,
                  consecutive=verdict.consecutive, grad_norm=grad_norm, step=step)
        )  # fmt: skip

    def keep(self, panic: Panic) -> Panic:
        """Make ``panic`` the one awaiting a rollback (a check's own, or the group's agreed one);
        its reason becomes ``panic_reason`` (and a loss panic's loss ``panic_loss``)."""
        self.pending = panic
        self.panic_reason = panic.reason
        if panic.reason in _LOSS_REASONS:
            self.panic_loss = panic.loss
        return panic

    def set_panic_state(self, *, reason: str | None, loss: float | None, anomaly_pending: bool) -> None:
        """Write the original Governor's panic state (see the class docstring)."""
        self.panic_reason, self.panic_loss, self.anomaly_pending = reason, loss, bool(anomaly_pending)

    def panic_for_rollback(self, manual_reason: str) -> tuple[Panic, bool]:
        """The pending panic (and True), or a stand-in for a rollback no panic preceded: reason
        ``manual_reason``, NaN loss, the current loss threshold (and False)."""
        if self.pending is not None:
            return self.pending, True
        stand_in = Panic(
            reason=manual_reason, loss=math.nan, threshold=self.loss.spikes.threshold(),
            consecutive=self.loss.consecutive_panics,
        )  # fmt: skip
        return stand_in, False

    def clear_panic(self) -> None:
        """After a rollback: no pending panic, no panic state, both anomaly runs back to 0
        (histories kept)."""
        self.pending = None
        self.set_panic_state(reason=None, loss=None, anomaly_pending=False)
        self.loss.consecutive_panics = 0
        self.grad_norms.consecutive = 0

    def reset(self) -> None:
        """A new episode: empty histories and no panic."""
        self.loss.reset()
        self.grad_norms.reset()
        self.pending = None
        self.set_panic_state(reason=None, loss=None, anomaly_pending=False)


__all__ = ["Panic", "Watch", "gradient_norm"]
