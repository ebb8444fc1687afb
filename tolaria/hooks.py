"""Judging a step in a loop tolaria does not own: trainers that call backward and step themselves.

::

    hook = TrainerHook(governor, optimizer, snapshot_every=10)
    for inputs, targets in loader:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        outcome = hook.after_backward(loss)  # judge; roll back if sick; snapshot on schedule
        optimizer.step()                     # changes nothing after a rollback: no gradients left
        optimizer.zero_grad()

One :meth:`TrainerHook.after_backward` call, in this order:

1. the loss, times ``loss_scale`` (the per-example loss: a trainer that divides each micro-batch's
   loss by its accumulation count gives that count), goes to ``check_vital_signs`` — a panic rolls
   back;
2. a micro-batch before the last of its accumulation window (``last_micro_batch=False``) stops
   here: its gradients are incomplete, so weights and gradients are judged once per window;
3. with a ``GradScaler``, the gradients are brought to true units (:func:`tolaria.amp.true_units`).
   An overflow that the scaler will skip is a skipped step (``StepOutcome.scaler_skipped``): it is
   not judged further and takes no snapshot, since the scaler leaves the weights as they were.
   ``scaler_overflow_limit`` overflows in a row are a panic of their own,
   ``governor_scaler_overflow`` (a scaler that keeps finding Inf is not calibrating any more);
4. ``check_health()`` (weights and gradients) — a panic rolls back;
5. when due, ``snapshot()``: after ``snapshot_every`` healthy optimizer steps since the last
   snapshot or rollback, and never while an anomaly streak is building. The snapshot comes before
   the trainer's optimizer step, so the Last Known Good is always a state some check has seen.

After a rollback the gradients are cleared (set to None), so the trainer's ``optimizer.step()``
changes nothing. A scaler that has not unscaled this step yet would raise "No inf checks were
recorded" in its ``step()`` with no gradient at all, so there one Inf gradient is left instead:
the scaler then skips the step as an overflow (and lowers its scale once).

:meth:`TrainerHook.begin` splits the call for loops that can judge the loss before backward
(:class:`tolaria.guard.GuardedStep` does): :meth:`PendingStep.check_loss` first, backward only when
it returned None, then :meth:`PendingStep.after_backward`. With ``deferred=True`` (CUDA, opt-in)
step 1 and 4 become one ``governor.observe(loss)`` after backward (see :mod:`tolaria.guard`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tolaria import amp
from tolaria.governor import GovernorReport, SnapshotInfo, TolariaGovernor
from tolaria.optim import unwrap_optimizer
from tolaria.outcome import StepOutcome
from tolaria.recovery.skiplist import BatchLog, append_to_skip_file
from tolaria.vitals import check_loss_tensor

#: The panic reason of ``scaler_overflow_limit`` GradScaler overflows in a row.
REASON_SCALER_OVERFLOW = "governor_scaler_overflow"
#: Enough for a GradScaler to halve its default initial scale (2**16) down to 1.
DEFAULT_SCALER_OVERFLOW_LIMIT = 16


def check_count(name: str, value: object) -> int:
    """``value`` when it is an int >= 1 (not a bool); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_loss_scale(value: object) -> float:
    """``value`` as a float when it is a finite number > 0; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"loss_scale must be a finite number > 0, got {value!r}")
    return float(value)


class TrainerHook:
    """Judges steps that a trainer runs itself (see the module docstring for the order).

    Args:
        governor: watches the model; it must know ``optimizer`` (``TolariaGovernor(model,
            optimizer=optimizer)``, wrappers compare by the optimizer they wrap).
        optimizer: the optimizer that trains the governed model (or a trainer's wrapper of it).
        snapshot_every: healthy optimizer steps between snapshots (>= 1).
        loss_scale: the factor that turns the given loss into the per-example loss (> 0), e.g. the
            gradient-accumulation count of a trainer that divides each micro-batch's loss by it;
            :meth:`after_backward` can override it per call.
        scaler: the run's ``torch.amp.GradScaler``, if any (a disabled one counts as none).
        scaler_overflow_limit: overflows in a row that become a ``governor_scaler_overflow`` panic.
        track_grad_norm, synchronize, env_id, deferred: as for :class:`tolaria.guard.GuardedStep`.
        skip_file: a JSON file the identities of abandoned batches are appended to at every
            rollback (atomically), for :class:`tolaria.SkipList` in a resumed run; needs
            ``batch_id`` in :meth:`after_backward`/:meth:`begin`. None: not written.

    Raises:
        TypeError: ``governor``, ``optimizer``, ``scaler`` or ``deferred`` has the wrong type.
        ValueError: a count below 1, a bad ``loss_scale``, or the governor does not know ``optimizer``.
        NotImplementedError: ``deferred=True`` with a process group or with a scaler.
    """

    def __init__(
        self,
        governor: TolariaGovernor,
        optimizer: torch.optim.Optimizer,
        *,
        snapshot_every: int = 10,
        loss_scale: float = 1.0,
        scaler: torch.amp.GradScaler | None = None,
        scaler_overflow_limit: int = DEFAULT_SCALER_OVERFLOW_LIMIT,
        track_grad_norm: bool = False,
        synchronize: bool = False,
        env_id: int = 0,
        deferred: bool = False,
        skip_file: str | Path | None = None,
    ) -> None:
        if not isinstance(governor, TolariaGovernor):
            raise TypeError(f"governor must be a TolariaGovernor, got {type(governor).__name__}")
        real = unwrap_optimizer(optimizer)
        if real is None:
            raise TypeError("optimizer must be a torch.optim.Optimizer, got None")
        self.snapshot_every = check_count("snapshot_every", snapshot_every)
        if governor.optimizer is not real:
            # Restoring weights with stale (or cleared) momenta makes the next updates wrong.
            raise ValueError(
                "the governor does not know this optimizer; build it with "
                "TolariaGovernor(model, optimizer=optimizer) so the optimizer's state is captured "
                "and restored together with the model"
            )
        if not isinstance(deferred, bool):
            raise TypeError(f"deferred must be True or False, got {type(deferred).__name__}")
        self.scaler = amp.check_scaler(scaler)
        if deferred and governor.distributed:
            raise NotImplementedError(
                "deferred=True is not supported with a process group yet; "
                "use deferred=False, whose checks every rank agrees on"
            )
        if deferred and self.scaler is not None:
            raise NotImplementedError(
                "deferred=True is not supported with a GradScaler yet (an overflow would be judged "
                "steps late, after the scaler skipped it); use deferred=False"
            )
        self.governor = governor
        self.optimizer = optimizer
        self.loss_scale = check_loss_scale(loss_scale)
        self.scaler_overflow_limit = check_count("scaler_overflow_limit", scaler_overflow_limit)
        if not isinstance(track_grad_norm, bool):
            raise TypeError(f"track_grad_norm must be True or False, got {type(track_grad_norm).__name__}")
        self.track_grad_norm = track_grad_norm
        self.env_id = env_id
        self.deferred = deferred
        self.steps_taken = 0
        #: GradScaler overflows in a row (reset by a judged healthy step and by a rollback).
        self.overflow_streak = 0
        self._real_optimizer = real
        self._healthy_since_snapshot = 0
        if skip_file is not None and not isinstance(skip_file, (str, Path)):
            raise TypeError(f"skip_file must be a path or None, got {type(skip_file).__name__}")
        self.skip_file = None if skip_file is None else Path(skip_file)
        #: Batches seen since the Last Known Good (their identities, when the loop passes them).
        self.batches = BatchLog()
        self._sync = synchronize and any(p.is_cuda for p in governor.model.parameters())

    def now(self) -> float:
        """``time.perf_counter()``, after a device sync when ``synchronize`` is on (CUDA)."""
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def after_backward(
        self,
        loss: torch.Tensor | float | None,
        *,
        last_micro_batch: bool = True,
        loss_scale: float | None = None,
        batch_id: object = None,
    ) -> StepOutcome:
        """Judge the step whose backward just ran (see the module docstring), roll back if it is
        sick, snapshot when due. ``loss``: the loss that was backpropagated, unscaled by any
        GradScaler (a one-element tensor or a number; None when the trainer does not expose it:
        the loss is then not judged); ``last_micro_batch``: whether the optimizer steps after
        this backward (False for the micro-batches before it in gradient accumulation);
        ``loss_scale``: overrides the hook's for this call; ``batch_id``: this batch's identity
        (any JSON-serialisable value: a sampler index, a shard offset) for the skip list.

        Raises TypeError for a bad ``loss``, ValueError for ``last_micro_batch=False`` in deferred
        mode, and the RuntimeError of ``execute_rollback`` (no Last Known Good, architecture drift).
        """
        pending = self.begin(loss, loss_scale=loss_scale, batch_id=batch_id)
        return pending.after_backward(last_micro_batch=last_micro_batch)

    def begin(
        self,
        loss: torch.Tensor | float | None,
        *,
        loss_scale: float | None = None,
        started: float | None = None,
        batch_id: object = None,
    ) -> PendingStep:
        """Start judging one step: read the loss (times ``loss_scale``) now. ``started``: the
        :meth:`now` at which the caller's step began (default: now); ``batch_id``: see
        :meth:`after_backward`. Raises TypeError for a loss that is neither None, a number nor a
        one-element real tensor (bool and complex are refused), or a ``batch_id`` that is not
        JSON-serialisable; ValueError for a loss on the meta device."""
        start = self.now() if started is None else started
        scale = self.loss_scale if loss_scale is None else check_loss_scale(loss_scale)
        # The loss is validated before anything is recorded: a refused step leaves no trace.
        judged: torch.Tensor | float | None = None
        value = math.nan
        if isinstance(loss, torch.Tensor):
            # One validation for every mode: more than one element, complex or bool is a TypeError,
            # a meta tensor a ValueError (the deferred stager would refuse them later otherwise).
            scalar = check_loss_tensor(loss)
            tensor = scalar * scale if scale != 1.0 else scalar
            # Deferred mode reads no loss on CUDA (that read is the sync it avoids); a loss read
            # here is judged as that float, so no later check reads it again.
            if not self.deferred or not tensor.is_cuda or self._sync:
                value = float(tensor)
                judged = value
            else:
                judged = tensor
        elif loss is not None:
            if isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise TypeError(f"loss must be a one-element tensor or a number, got {type(loss).__name__}")
            value = float(loss) * scale
            judged = value
        if batch_id is not None:
            self.batches.saw(batch_id)
        step = self.steps_taken
        self.steps_taken += 1
        return PendingStep(self, step, start, judged, value)

    def _grad_norm(self) -> float | None:
        # The governed model's gradients, the ones the health check reads: one meaning of
        # grad_norm whichever path computes it (an optimizer may train only part of the model).
        grads = [p.grad for p in self.governor.model.parameters() if p.grad is not None]
        if not grads:
            return None
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads])
        return float(torch.linalg.vector_norm(norms))

    def _clear_gradients(self, *, mark_overflow: bool) -> None:
        # Stale (possibly Inf) gradients must not reach the trainer's step after a rollback.
        self.governor.model.zero_grad(set_to_none=True)
        self._real_optimizer.zero_grad(set_to_none=True)
        if mark_overflow and self.scaler is not None and not amp.is_unscaled(self.scaler, self.optimizer):
            amp.mark_overflow(self.optimizer)


class PendingStep:
    """One step being judged by a :class:`TrainerHook` (from :meth:`TrainerHook.begin`): call
    :meth:`check_loss` (optional, before backward), then :meth:`after_backward` unless it
    returned an outcome. Not reusable."""

    def __init__(
        self, hook: TrainerHook, step: int, start: float, loss: torch.Tensor | float | None, loss_value: float
    ) -> None:
        self.hook = hook
        self.step = step
        self.loss_value = loss_value
        self._start = start
        self._loss = loss
        self._loss_judged = False
        self._check = 0.0
        self._grad_norm: float | None = None
        #: Shadow mode: the report of the rollback that was not done (the step goes on).
        self._observed: GovernorReport | None = None

    def check_loss(self) -> StepOutcome | None:
        """Judge the loss (``check_vital_signs``): the rolled-back outcome on a panic (the step is
        over; with no backward run yet, nothing is left to undo), None otherwise (also in shadow
        mode, where the step goes on). Does nothing in deferred mode or without a loss (the loss
        is then judged, if at all, after backward)."""
        hook = self.hook
        if self._loss_judged or self._loss is None or hook.deferred:
            return None
        self._loss_judged = True
        mark = hook.now()
        panicked = hook.governor.check_vital_signs(self.loss_value)
        self._check += hook.now() - mark
        return self._roll_back(mark_overflow=False) if panicked else None  # None in shadow mode too

    def after_backward(self, *, last_micro_batch: bool = True) -> StepOutcome:
        """Judge the rest of the step once backward has run (the loss too, unless
        :meth:`check_loss` did); see :meth:`TrainerHook.after_backward`."""
        hook = self.hook
        if hook.deferred:
            if not last_micro_batch:
                raise ValueError(
                    "deferred checks judge whole optimizer steps: call after_backward once per "
                    "optimizer step (last_micro_batch=True), or use deferred=False"
                )
            return self._observe()
        if not self._loss_judged and self._loss is not None:
            self._loss_judged = True
            mark = hook.now()
            panicked = hook.governor.check_vital_signs(self.loss_value)
            self._check += hook.now() - mark
            if panicked and (out := self._roll_back(mark_overflow=last_micro_batch)) is not None:
                return out
        if not last_micro_batch:
            return self._outcome(stepped=False, accumulating=True)
        with amp.true_units(hook.scaler, hook.optimizer) as overflow:
            if overflow:
                return self._overflow()
            hook.overflow_streak = 0
            mark = hook.now()
            panicked = hook.governor.check_health()
            self._check += hook.now() - mark
            if hook.track_grad_norm:  # the check's own norm when it read the gradients: no second pass
                norm = hook.governor.last_grad_norm
                self._grad_norm = norm if norm is not None else hook._grad_norm()
        if panicked and (out := self._roll_back(mark_overflow=True)) is not None:
            return out
        return self._finish()

    def _observe(self) -> StepOutcome:
        # Backward ran before the loss is judged: the verdict comes later. A sick step's update
        # is undone by the rollback that its verdict triggers.
        hook = self.hook
        if hook.track_grad_norm:
            self._grad_norm = hook._grad_norm()
        loss = self._loss if self._loss is not None else math.nan
        mark = hook.now()
        panicked = hook.governor.observe(loss, step=self.step)
        self._check += hook.now() - mark
        if panicked and (out := self._roll_back(mark_overflow=False)) is not None:
            return out
        return self._finish()

    def _overflow(self) -> StepOutcome:
        hook = self.hook
        hook.overflow_streak += 1
        if hook.overflow_streak < hook.scaler_overflow_limit:
            return self._outcome(stepped=False, scaler_skipped=True)
        # The Governor's drop-in panic state (esper-lite's trainer writes it too): the rollback
        # then reports this reason and loss, in its report and in its one telemetry event.
        hook.governor._panic_reason = REASON_SCALER_OVERFLOW
        hook.governor._panic_loss = self.loss_value
        out = self._roll_back(mark_overflow=True)
        return out if out is not None else self._outcome(stepped=False, scaler_skipped=True)

    def _finish(self) -> StepOutcome:
        """The checks passed: snapshot when due."""
        hook = self.hook
        if hook.governor.anomaly_streak == 0:
            hook._healthy_since_snapshot += 1
            if hook._healthy_since_snapshot >= hook.snapshot_every:
                mark = hook.now()
                snapshot = hook.governor.snapshot()
                seconds = hook.now() - mark
                hook._healthy_since_snapshot = 0
                if snapshot.committed is not False:  # the window a rollback abandons starts here
                    hook.batches.committed(keep_last=True)
                if hook.governor.pending_panic is not None:
                    # Resolving the previous capture judged a late verdict, and it panicked.
                    out = self._roll_back(mark_overflow=True, snapshot=snapshot, snapshot_seconds=seconds)
                    if out is not None:
                        return out
                return self._outcome(stepped=True, snapshot=snapshot, snapshot_seconds=seconds)
        return self._outcome(stepped=True)

    def _roll_back(
        self, *, mark_overflow: bool, snapshot: SnapshotInfo | None = None, snapshot_seconds: float = 0.0
    ) -> StepOutcome | None:
        """Roll back (the step is over: its outcome), or, in shadow mode, record the rollback
        that was not done and return None: the step goes on as if unguarded."""
        hook = self.hook
        mark = hook.now()
        window = hook.batches.take_window()
        report = hook.governor.execute_rollback(
            env_id=hook.env_id, optimizer=hook.optimizer, skipped_batches=window
        )
        rollback = hook.now() - mark
        if not report.rollback_occurred:
            self._observed = report
            self._check += rollback
            return None
        if window and hook.skip_file is not None:
            append_to_skip_file(hook.skip_file, window)
        hook._clear_gradients(mark_overflow=mark_overflow)
        # The model now IS the Last Known Good: count healthy steps from here.
        hook._healthy_since_snapshot = 0
        hook.overflow_streak = 0
        # The pending panic's reason travels in the report; read it from there, not from internals.
        reason = report.panic_reason or report.reason
        panic_step = report.panic_step if report.panic_step is not None else self.step
        return StepOutcome(
            step=self.step, loss=self.loss_value, grad_norm=self._grad_norm, panic_reason=reason,
            report=report, snapshot=snapshot, stepped=False, anomaly_streak=0, check_seconds=self._check,
            snapshot_seconds=snapshot_seconds, rollback_seconds=rollback,
            step_seconds=hook.now() - self._start, panic_step=panic_step,
            recovery_action=report.recovery_action, skipped_batches=window,
        )  # fmt: skip

    def _outcome(
        self,
        *,
        stepped: bool,
        snapshot: SnapshotInfo | None = None,
        snapshot_seconds: float = 0.0,
        scaler_skipped: bool = False,
        accumulating: bool = False,
    ) -> StepOutcome:
        hook = self.hook
        observed = self._observed  # shadow mode: a panic was seen and nothing was touched
        return StepOutcome(
            step=self.step, loss=self.loss_value, grad_norm=self._grad_norm,
            panic_reason=None if observed is None else observed.panic_reason, report=observed,
            snapshot=snapshot, stepped=stepped, anomaly_streak=hook.governor.anomaly_streak,
            check_seconds=self._check, snapshot_seconds=snapshot_seconds, rollback_seconds=0.0,
            step_seconds=hook.now() - self._start, scaler_skipped=scaler_skipped, accumulating=accumulating,
            recovery_action="" if observed is None else observed.recovery_action,
        )  # fmt: skip


__all__ = [
    "DEFAULT_SCALER_OVERFLOW_LIMIT",
    "REASON_SCALER_OVERFLOW",
    "PendingStep",
    "StepOutcome",
    "TrainerHook",
]
