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
3. backward (``loss.backward()``, or the ``backward`` given, e.g. ``accelerator.backward``), then
   ``check_health()`` (weights and gradients) — a panic rolls back, no step;
4. when due, ``snapshot()`` — after ``snapshot_every`` healthy steps since the last snapshot or
   rollback, and never while an anomaly streak of the loss or the gradient norm is building
   (``governor.anomaly_streak > 0``);
5. ``optimizer.step()``.

Steps 2 to 4 are :class:`tolaria.hooks.TrainerHook`'s, the one implementation of judging a step;
this class adds what a loop of its own does around them.

With ``scaler=torch.amp.GradScaler(...)`` (fp16 mixed precision) step 3 backpropagates
``scaler.scale(loss)`` and calls ``scaler.unscale_(optimizer)`` before the check, so gradients
are judged in true units; an overflow that the scaler skips is a skipped step
(``StepOutcome.scaler_skipped``), not a panic, unless ``scaler_overflow_limit`` come in a row
(``governor_scaler_overflow``); step 5 is ``scaler.step(optimizer)`` then ``scaler.update()``,
and a rollback after the unscale still calls ``scaler.update()``, so the scaler is ready for the
next step. Autocast (fp16 or bf16) belongs in the closure, around the forward.

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

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from tolaria.governor import TolariaGovernor
from tolaria.hooks import DEFAULT_SCALER_OVERFLOW_LIMIT, StepOutcome, TrainerHook
from tolaria.optim import unwrap_optimizer


class GuardedStep:
    """Runs training steps under a :class:`TolariaGovernor` (see the module docstring for the order).

    Args:
        governor: watches the model; it must know ``optimizer`` (``TolariaGovernor(model,
            optimizer=optimizer)``) so the optimizer's state is captured and restored with it.
        optimizer: the optimizer that trains the governed model, or a trainer's wrapper of it
            (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``: compared by
            the optimizer they wrap).
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
        backward: called with the loss (scaled, with a scaler) instead of ``loss.backward()``,
            e.g. ``accelerator.backward``.
        scaler: a ``torch.amp.GradScaler`` that this step owns: it scales, unscales, steps and
            updates (see the module docstring). None, or a disabled scaler: no scaling.
        scaler_overflow_limit: overflows in a row that become a ``governor_scaler_overflow`` panic.
        skip_file: where the batches a rollback abandons are recorded for a resumed run (see
            :class:`tolaria.SkipList`); pass each step's ``batch_id``. None: not written.

    A Governor with a :class:`tolaria.RecoveryPolicy` applies it after every rollback
    (``StepOutcome.recovery_action``); in shadow mode (``mode="observe"``) a panic is reported in
    the outcome and the step goes on exactly as it would unguarded.

    Raises:
        TypeError: ``governor``, ``optimizer``, ``scaler``, ``backward`` or ``deferred`` has the
            wrong type.
        ValueError: ``snapshot_every < 1``, ``scaler_overflow_limit < 1``, or the governor does
            not know ``optimizer``.
        NotImplementedError: ``deferred=True`` with a governor that has a process group, or with
            a scaler.
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
        backward: Callable[[torch.Tensor], object] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        scaler_overflow_limit: int = DEFAULT_SCALER_OVERFLOW_LIMIT,
        skip_file: str | Path | None = None,
    ) -> None:
        if not isinstance(governor, TolariaGovernor):
            raise TypeError(f"governor must be a TolariaGovernor, got {type(governor).__name__}")
        if unwrap_optimizer(optimizer) is None:
            raise TypeError("optimizer must be a torch.optim.Optimizer, got None")
        if backward is not None and not callable(backward):
            raise TypeError(
                f"backward must be a callable taking the loss, or None, got {type(backward).__name__}"
            )
        self.hook = TrainerHook(
            governor, optimizer, snapshot_every=snapshot_every, scaler=scaler,
            scaler_overflow_limit=scaler_overflow_limit, track_grad_norm=track_grad_norm,
            synchronize=synchronize, env_id=env_id, deferred=deferred, skip_file=skip_file,
        )  # fmt: skip
        self.governor = governor
        self.optimizer = optimizer
        self.scaler = self.hook.scaler
        self.backward = backward

    @property
    def snapshot_every(self) -> int:
        return self.hook.snapshot_every

    @property
    def steps_taken(self) -> int:
        """Calls made so far (rolled-back attempts count too)."""
        return self.hook.steps_taken

    @property
    def deferred(self) -> bool:
        return self.hook.deferred

    def __call__(self, closure: Callable[[], torch.Tensor], *, batch_id: object = None) -> StepOutcome:
        """Run one guarded step; ``closure()`` does the forward pass and returns the scalar loss.
        ``batch_id``: this batch's identity (any JSON-serialisable value), recorded so that a
        rollback can name the batches it abandons (the event, ``StepOutcome.skipped_batches``,
        ``skip_file``); without it nothing is recorded.

        Raises whatever the closure, backward or the optimizer raise, and the RuntimeError of
        ``execute_rollback`` (no Last Known Good, architecture drift).
        """
        hook = self.hook
        start = hook.now()
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"the closure must return a one-element loss tensor, got {shape}")
        # The loss is read here (the forward's device sync is the forward's cost, not the Governor's).
        pending = hook.begin(loss, started=start, batch_id=batch_id)
        early = pending.check_loss()  # a sick loss is rolled back before its backward runs
        if early is not None:
            return early
        scaler = self.scaler
        to_backward = scaler.scale(loss) if scaler is not None else loss
        if self.backward is not None:
            self.backward(to_backward)
        else:
            to_backward.backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        outcome = pending.after_backward()
        if scaler is not None:
            if not outcome.rolled_back:
                scaler.step(self.optimizer)  # skips the optimizer step itself on an overflow
            scaler.update()  # also after a rollback: the unscale above must be closed by an update
        elif outcome.stepped:
            self.optimizer.step()
        return replace(outcome, step_seconds=hook.now() - start)


__all__ = ["GuardedStep", "StepOutcome"]
