"""The guarded training step: the recommended way to wire a :class:`TolariaGovernor` into a loop.

::

    governor = TolariaGovernor(model, optimizer=optimizer, random_guess_loss=math.log(classes))
    guard = GuardedStep(governor, optimizer, snapshot_every=10)
    for inputs, targets in loader:
        outcome = guard(lambda: loss_fn(model(inputs), targets))
        if outcome.rolled_back:
            ...  # the model and optimizer are back at the Last Known Good; react here

One call is one attempt at an optimizer step, in this order:

1. zero the gradients, run the closure (forward) and get the loss;
2. ``check_vital_signs(loss)`` — a panic rolls back at once: no backward, no step;
3. ``loss.backward()``, then ``check_health()`` (weights and gradients) — a panic rolls back, no step;
4. when due, ``snapshot()`` — after ``snapshot_every`` healthy steps since the last snapshot or
   rollback, and never while an anomaly streak of the loss or the gradient norm is building
   (``governor.anomaly_streak > 0``);
5. ``optimizer.step()``.

With ``deferred=True`` steps 2 and 3 become one ``governor.observe(loss)`` after backward: the
checks are enqueued with no host sync, and a step's verdict is judged up to
``governor.max_pending_steps`` steps later (at once on CPU). A late panic rolls back at the step
that found it (``StepOutcome.step``) and names the step whose checks were sick
(``StepOutcome.panic_step``); the optimizer steps taken in between are undone by the rollback,
and a snapshot taken in between is never committed (see :mod:`tolaria.deferred`). Opt-in: a
deferred :class:`StepOutcome` has no loss float on CUDA (reading it would be the sync this mode
avoids), panics arrive late, and process groups are not supported yet.

The snapshot comes *before* the optimizer step on purpose: at that point the weights have just
produced a healthy loss and healthy gradients, so the Last Known Good is always a state some check
has seen. A snapshot after the step would capture an update no check has looked at yet — the
first step of a learning-rate blow-up, for example — and a rollback would then restore it.

The Governor restores weights and optimizer *state* (momenta), not parameter-group
hyperparameters such as the learning rate: if the failure came from the learning rate, lower it
when ``outcome.rolled_back`` is true. Only the Governor's public API is used here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tolaria.governor import GovernorReport, SnapshotInfo, TolariaGovernor


@dataclass(frozen=True)
class StepOutcome:
    """What one :class:`GuardedStep` call did.

    Attributes:
        step: index of the call (0-based); rolled-back attempts count too.
        loss: the closure's loss as a float, exactly as seen (NaN/Inf included); NaN in deferred
            mode for a CUDA loss unless ``synchronize`` is on (no host read there).
        grad_norm: global L2 norm of the model's gradients after backward, when ``track_grad_norm`` is on
            and backward ran; None otherwise.
        panic_reason: the Governor's panic reason (``governor_nan``, ``governor_lobotomy``, ...),
            None for a healthy step.
        panic_step: the step whose checks found the fault: ``step`` itself in blocking mode, an
            earlier step when a deferred verdict arrived late; None for a healthy step.
        report: the rollback's :class:`GovernorReport`, None when there was no rollback.
        snapshot: the snapshot taken during this step, None when none was due.
        stepped: whether ``optimizer.step()`` ran.
        anomaly_streak: ``governor.anomaly_streak`` after the checks: > 0 while a loss divergence
            or a gradient-norm explosion streak is building (such steps still step the optimizer
            but never snapshot).
        check_seconds, snapshot_seconds, rollback_seconds: host time inside the Governor's
            checks, ``snapshot()`` and ``execute_rollback()``.
        step_seconds: host time of the whole call (forward, backward, step and Governor).
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

    @property
    def rolled_back(self) -> bool:
        """True when this step ended in a rollback to the Last Known Good."""
        return self.report is not None

    @property
    def healthy(self) -> bool:
        """True when no check panicked."""
        return self.panic_reason is None

    @property
    def governor_seconds(self) -> float:
        """All host time spent inside Governor calls during this step."""
        return self.check_seconds + self.snapshot_seconds + self.rollback_seconds


class GuardedStep:
    """Runs training steps under a :class:`TolariaGovernor` (see the module docstring for the order).

    Args:
        governor: watches the model; it must know ``optimizer`` (``TolariaGovernor(model,
            optimizer=optimizer)``) so the optimizer's state is captured and restored with it.
        optimizer: the optimizer that trains the governed model.
        snapshot_every: healthy steps between snapshots (>= 1). The Governor's constructor took
            the first one.
        track_grad_norm: report the global L2 norm of the governed model's gradients in
            :attr:`StepOutcome.grad_norm`. The blocking checks already compute it
            (``governor.last_grad_norm``) when the governor checks gradients; otherwise, and with
            ``deferred=True`` (whose verdicts arrive steps later), it costs one extra read of
            every gradient and a device sync on GPU.
        synchronize: on CUDA, synchronize the device before reading each timer, so the seconds in
            :class:`StepOutcome` measure device work, not just kernel launches (costs the overlap).
        env_id: passed to ``execute_rollback`` (identifies the environment in telemetry).
        deferred: judge each step with ``governor.observe(loss)`` instead of the blocking
            checks (see the module docstring). Default False, also on CUDA, for now: the
            blocking outcome (a loss float, a panic at the step it happens) is what existing
            callers read, and the gain is yet to be measured on a GPU.

    Raises:
        TypeError: ``governor``, ``optimizer`` or ``deferred`` has the wrong type.
        ValueError: ``snapshot_every < 1``, or the governor does not know ``optimizer``.
        NotImplementedError: ``deferred=True`` with a governor that has a process group.
    """

    def __init__(
        self,
        governor: TolariaGovernor,
        optimizer: torch.optim.Optimizer,
        *,
        snapshot_every: int = 10,
        track_grad_norm: bool = False,
        synchronize: bool = False,
        env_id: int = 0,
        deferred: bool = False,
    ) -> None:
        if not isinstance(governor, TolariaGovernor):
            raise TypeError(f"governor must be a TolariaGovernor, got {type(governor).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be an int >= 1, got {snapshot_every!r}")
        if governor.optimizer is not optimizer:
            # Restoring weights with stale (or cleared) momenta makes the next updates wrong.
            raise ValueError(
                "the governor does not know this optimizer; build it with "
                "TolariaGovernor(model, optimizer=optimizer) so the optimizer's state is captured "
                "and restored together with the model"
            )
        if not isinstance(deferred, bool):
            raise TypeError(f"deferred must be True or False, got {type(deferred).__name__}")
        if deferred and governor.distributed:
            raise NotImplementedError(
                "GuardedStep(deferred=True) is not supported with a process group yet; "
                "use deferred=False, whose checks every rank agrees on"
            )
        self.governor = governor
        self.optimizer = optimizer
        self.snapshot_every = snapshot_every
        self.track_grad_norm = track_grad_norm
        self.env_id = env_id
        self.deferred = deferred
        self.steps_taken = 0
        self._healthy_since_snapshot = 0
        self._sync = synchronize and any(p.is_cuda for p in governor.model.parameters())

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _grad_norm(self) -> float | None:
        # The governed model's gradients, the ones the health check reads: one meaning of
        # grad_norm whichever path computes it (an optimizer may train only part of the model).
        grads = [p.grad for p in self.governor.model.parameters() if p.grad is not None]
        if not grads:
            return None
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads])
        return float(torch.linalg.vector_norm(norms))

    def __call__(self, closure: Callable[[], torch.Tensor]) -> StepOutcome:
        """Run one guarded step; ``closure()`` does the forward pass and returns the scalar loss.

        Raises whatever the closure, backward or the optimizer raise, and the RuntimeError of
        ``execute_rollback`` (no Last Known Good, architecture drift).
        """
        step = self.steps_taken
        self.steps_taken += 1
        start = self._now()
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"the closure must return a one-element loss tensor, got {shape}")
        if self.deferred:
            return self._deferred_step(step, loss, start)
        # Read once here (the forward's device sync is the forward's cost, not the Governor's);
        # the Governor accepts the float.
        loss_value = float(loss.detach().reshape(()))

        mark = self._now()
        panicked = self.governor.check_vital_signs(loss_value)
        check = self._now() - mark
        if panicked:
            return self._roll_back(step, loss_value, None, start, check)

        loss.backward()
        mark = self._now()
        panicked = self.governor.check_health()
        check += self._now() - mark
        grad_norm = None
        if self.track_grad_norm:  # the check's own norm when it read the gradients: no second pass
            grad_norm = self.governor.last_grad_norm
            if grad_norm is None:
                grad_norm = self._grad_norm()
        if panicked:
            return self._roll_back(step, loss_value, grad_norm, start, check)
        return self._finish(step, loss_value, grad_norm, start, check)

    def _deferred_step(self, step: int, loss: torch.Tensor, start: float) -> StepOutcome:
        # Backward runs before the loss is judged: the verdict comes later. A sick step's update
        # is undone by the rollback that its verdict triggers.
        free = not loss.is_cuda or self._sync  # reading the loss would not add a device sync
        loss_value = float(loss.detach().reshape(())) if free else math.nan
        loss.backward()
        grad_norm = self._grad_norm() if self.track_grad_norm else None
        mark = self._now()
        panicked = self.governor.observe(loss, step=step)
        check = self._now() - mark
        if panicked:
            return self._roll_back(step, loss_value, grad_norm, start, check)
        return self._finish(step, loss_value, grad_norm, start, check)

    def _finish(
        self, step: int, loss: float, grad_norm: float | None, start: float, check: float
    ) -> StepOutcome:
        """The checks passed so far: snapshot when due, then step the optimizer."""
        streak = self.governor.anomaly_streak
        snapshot, snapshot_seconds = None, 0.0
        if streak == 0:
            self._healthy_since_snapshot += 1
            if self._healthy_since_snapshot >= self.snapshot_every:
                mark = self._now()
                snapshot = self.governor.snapshot()
                snapshot_seconds = self._now() - mark
                self._healthy_since_snapshot = 0
                if self.governor.pending_panic is not None:
                    # Resolving the previous capture judged a late verdict, and it panicked.
                    return self._roll_back(step, loss, grad_norm, start, check, snapshot_seconds, snapshot)
        self.optimizer.step()
        return StepOutcome(
            step, loss, grad_norm, None, None, snapshot, True, streak,
            check, snapshot_seconds, 0.0, self._now() - start,
        )  # fmt: skip

    def _roll_back(
        self, step: int, loss: float, grad_norm: float | None, start: float, check: float,
        snapshot_seconds: float = 0.0, snapshot: SnapshotInfo | None = None,
    ) -> StepOutcome:  # fmt: skip
        # The pending panic's reason travels in the report; read it from there, not from internals.
        mark = self._now()
        report = self.governor.execute_rollback(env_id=self.env_id, optimizer=self.optimizer)
        rollback = self._now() - mark
        # Stale (possibly Inf) gradients must not leak into a caller's own step after this.
        self.optimizer.zero_grad(set_to_none=True)
        # The model now IS the Last Known Good: count healthy steps from here.
        self._healthy_since_snapshot = 0
        reason = report.panic_reason or report.reason
        panic_step = report.panic_step if report.panic_step is not None else step
        return StepOutcome(
            step, loss, grad_norm, reason, report, snapshot, False, 0, check, snapshot_seconds, rollback,
            self._now() - start, panic_step,
        )  # fmt: skip


__all__ = ["GuardedStep", "StepOutcome"]
