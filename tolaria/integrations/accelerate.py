"""tolaria in a loop driven by accelerate's ``Accelerator``: one call after ``accelerator.backward``.

::

    from tolaria.integrations.accelerate import TolariaHook

    hook = TolariaHook(accelerator, model, optimizer, random_guess_loss=math.log(10))
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(inputs), targets)
            accelerator.backward(loss)
            hook.after_backward(loss)
            optimizer.step()
            optimizer.zero_grad()

``model`` and ``optimizer`` are the prepared ones (``accelerator.prepare``); the Governor watches
``accelerator.unwrap_model(model)`` and captures the state of the optimizer inside accelerate's
``AcceleratedOptimizer``. Each :meth:`TolariaHook.after_backward`:

* judges the loss as the user computed it: ``accelerator.backward`` divides it by the
  accumulation count internally, so it is already the per-example loss;
* at ``accelerator.sync_gradients`` (the last micro-batch of an ``accelerator.accumulate``
  window) judges the weights and the gradients too, before any ``accelerator.clip_grad_norm_``
  that follows it, and takes the snapshot when due; with fp16 mixed precision the gradients are
  judged in true units (the accelerator's GradScaler has not unscaled yet: :mod:`tolaria.amp`),
  and an overflow that the scaler skips is a skipped step;
* after a rollback leaves no gradients (or, with fp16, one Inf gradient that makes the scaler skip
  the step), so the ``optimizer.step()`` that follows changes nothing;
* logs ``tolaria/rollbacks``, ``tolaria/scaler_skips``, ``tolaria/grad_norm`` and
  ``tolaria/last_panic`` through ``accelerator.log`` once per optimizer step (a no-op without
  trackers).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from accelerate import Accelerator
except ImportError as error:  # the extra is optional: say which one to install
    raise ImportError(
        "tolaria.integrations.accelerate needs accelerate: pip install 'tolaria[accelerate]'"
    ) from error

from tolaria.hooks import DEFAULT_SCALER_OVERFLOW_LIMIT, StepOutcome
from tolaria.integrations._common import GovernedRun, RunView


class TolariaHook(RunView):
    """Judges the steps of an ``Accelerator``-driven loop (see the module docstring).

    Args:
        accelerator: the run's ``Accelerator``.
        model: the prepared model (the Governor watches its unwrapped module).
        optimizer: the prepared optimizer (or the optimizer itself).
        snapshot_every: healthy optimizer steps between snapshots (>= 1).
        scaler_overflow_limit: fp16 GradScaler overflows in a row that become a
            ``governor_scaler_overflow`` panic.
        log: log the ``tolaria/*`` values through ``accelerator.log`` after each optimizer step.
        **governor_options: keyword options of :class:`tolaria.TolariaGovernor`
            (``random_guess_loss``, ``sensitivity``, ``recovery`` where the Governor takes a
            ``RecoveryPolicy``, ...).

    Raises:
        TypeError: ``accelerator`` is not an ``Accelerator``, an option the Governor does not take,
            or a model/optimizer of the wrong type.
        ValueError: a count below 1.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        snapshot_every: int = 10,
        scaler_overflow_limit: int = DEFAULT_SCALER_OVERFLOW_LIMIT,
        log: bool = True,
        **governor_options: Any,
    ) -> None:
        if not isinstance(accelerator, Accelerator):
            raise TypeError(
                f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}"
            )
        self.accelerator = accelerator
        self.log = log
        self.run = GovernedRun(
            "TolariaHook", snapshot_every=snapshot_every, scaler_overflow_limit=scaler_overflow_limit,
            governor_options=governor_options,
        )  # fmt: skip
        self.run.start(accelerator.unwrap_model(model), optimizer, scaler=accelerator.scaler)
        #: Optimizer steps judged so far (windows whose last micro-batch was judged).
        self.optimizer_steps = 0
        #: The latest call's outcome (None before the first).
        self.last_outcome: StepOutcome | None = None

    def after_backward(self, loss: torch.Tensor | float | None) -> StepOutcome:
        """Judge the micro-batch whose ``accelerator.backward(loss)`` just ran (``loss`` as given
        to it); see the module docstring. Raises what :meth:`tolaria.hooks.TrainerHook.after_backward`
        raises."""
        last = bool(self.accelerator.sync_gradients)
        outcome = self.run.judge(loss, last_micro_batch=last, optimizer_step=self.optimizer_steps)
        self.last_outcome = outcome
        if last:
            self.optimizer_steps += 1
            if self.log:
                self.accelerator.log(self.run.metrics())
        return outcome


__all__ = ["TolariaHook"]
