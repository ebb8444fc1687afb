"""tolaria in Hugging Face's ``Trainer``: a callback, or a Trainer subclass that sees more.

::

    from tolaria.integrations.transformers import TolariaCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[TolariaCallback()])

A ``TrainerCallback`` is never handed the loss and runs only at fixed points, so the callback alone
sees this much:

* **the loss**: the model's own ``outputs["loss"]`` (or ``outputs[0]``) of each training forward,
  read by a forward hook on the model. That is the per-example loss whatever
  ``gradient_accumulation_steps`` is (the Trainer divides it only afterwards); when the Trainer
  passes ``num_items_in_batch`` to the model, the model normalizes by the whole window's item count
  and the callback multiplies by ``gradient_accumulation_steps`` (exact for windows of equal item
  counts). A loss computed outside the model (``compute_loss_func``, label smoothing, an overridden
  ``compute_loss``) is not seen: only weights and gradients are judged then;
* **weights and gradients**: in ``on_pre_optimizer_step``, i.e. *after* ``max_grad_norm`` clipping.
  Non-finite weights and gradients are caught, but a gradient explosion is not: clipping has
  already scaled the norm down to ``max_grad_norm``. (With fp16, the Trainer has unscaled the
  gradients by then: they are judged in true units, and an overflow the scaler skips is a
  skipped step.);
* **the snapshot** is taken there too, before the optimizer step; a micro-batch before the last of
  its window has only its loss judged, in ``on_substep_end``;
* **logs**: ``tolaria/*`` keys are added in ``on_log``: they reach ``state.log_history`` and the
  callbacks after this one (the progress bar or printer), but not reporters that ran earlier
  (``report_to`` integrations come before user callbacks).

:class:`TolariaTrainer` (a ``Trainer`` subclass) sees everything: it judges the loss that
``training_step`` backpropagated (times the accumulation count: per-example), and at the last
micro-batch of each window the weights and the *pre-clipping* gradients, right after backward;
its ``tolaria/*`` keys go into every log before any callback or reporter sees it.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # the extra is optional: say which one to install
    raise ImportError(
        "tolaria.integrations.transformers needs transformers: pip install 'tolaria[transformers]'"
    ) from error

from tolaria.hooks import DEFAULT_SCALER_OVERFLOW_LIMIT, StepOutcome
from tolaria.integrations._common import GovernedRun, RunView


def _model_loss(output: Any) -> torch.Tensor | None:
    """The loss in a model's output, as ``Trainer.compute_loss`` reads it; None when there is none."""
    if isinstance(output, dict):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        return None
    return loss.detach() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class TolariaCallback(RunView, TrainerCallback):
    """Watches a ``Trainer`` run with a :class:`tolaria.TolariaGovernor` (see the module docstring
    for what a callback can and cannot see).

    Args:
        snapshot_every: healthy optimizer steps between snapshots (>= 1).
        scaler_overflow_limit: GradScaler overflows in a row that become a
            ``governor_scaler_overflow`` panic.
        **governor_options: keyword options of :class:`tolaria.TolariaGovernor`
            (``random_guess_loss``, ``sensitivity``, ``history_window``, ``recovery`` where the
            Governor takes a ``RecoveryPolicy``, ...).

    Raises TypeError for an option the Governor does not take, ValueError for a count below 1.
    """

    def __init__(
        self,
        *,
        snapshot_every: int = 10,
        scaler_overflow_limit: int = DEFAULT_SCALER_OVERFLOW_LIMIT,
        **governor_options: Any,
    ) -> None:
        self.run = GovernedRun(
            "TolariaCallback", snapshot_every=snapshot_every, scaler_overflow_limit=scaler_overflow_limit,
            governor_options=governor_options,
        )  # fmt: skip
        #: Set by :class:`TolariaTrainer`: it judges each step itself, from inside the Trainer.
        self.driven_by_trainer = False
        #: The latest step's outcome (None before the first judged step).
        self.last_outcome: StepOutcome | None = None
        self._pending_loss: torch.Tensor | None = None
        self._loss_scale = 1.0
        self._accumulation = 1.0
        self._forward_hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        # accelerate's AcceleratedOptimizer carries the fp16 GradScaler (None otherwise).
        self.run.start(model, optimizer, scaler=getattr(optimizer, "scaler", None))
        self._accumulation = float(args.gradient_accumulation_steps)
        if not self.driven_by_trainer:
            self._forward_hook = model.register_forward_hook(self._read_loss, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def _read_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return  # evaluation and prediction forwards
        loss = _model_loss(output)
        if loss is not None:
            # Judging happens after backward: a rollback during forward would break autograd.
            self._pending_loss = loss
            self._loss_scale = 1.0 if kwargs.get("num_items_in_batch") is None else self._accumulation

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.driven_by_trainer:
            self._judge_pending(state, last_micro_batch=False)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.driven_by_trainer:
            self._judge_pending(state, last_micro_batch=True)

    def _judge_pending(self, state: Any, *, last_micro_batch: bool) -> None:
        loss, self._pending_loss = self._pending_loss, None
        self.judge(loss, last_micro_batch=last_micro_batch, loss_scale=self._loss_scale, state=state)

    def judge(
        self, loss: torch.Tensor | float | None, *, last_micro_batch: bool, loss_scale: float, state: Any
    ) -> StepOutcome:
        """Judge one micro-batch (:meth:`tolaria.hooks.TrainerHook.after_backward`); ``state`` is
        the Trainer's ``TrainerState``. Called by the callback's hooks or by :class:`TolariaTrainer`."""
        outcome = self.run.judge(
            loss, last_micro_batch=last_micro_batch, loss_scale=loss_scale, optimizer_step=state.global_step
        )
        self.last_outcome = outcome
        return outcome

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.driven_by_trainer or logs is None or self.run.governor is None:
            return  # TolariaTrainer.log added the keys before anyone saw the logs
        metrics = self.run.metrics()
        logs.update(metrics)
        if state.log_history:  # the Trainer appended a copy of these logs just before on_log
            state.log_history[-1].update(metrics)


class TolariaTrainer(Trainer):
    """A ``Trainer`` that judges every step from inside: the exact loss it backpropagates (per
    example) and the gradients before ``max_grad_norm`` clipping (see the module docstring).

    Takes the ``Trainer``'s arguments plus ``tolaria``: the :class:`TolariaCallback` with the
    options (default: ``TolariaCallback()``); it is added to the Trainer's callbacks and keeps the
    counters (``trainer.tolaria.rollbacks``, ``.governor``, ...).
    """

    def __init__(self, *args: Any, tolaria: TolariaCallback | None = None, **kwargs: Any) -> None:
        if tolaria is not None and not isinstance(tolaria, TolariaCallback):
            raise TypeError(f"tolaria must be a TolariaCallback or None, got {type(tolaria).__name__}")
        super().__init__(*args, **kwargs)
        self.tolaria = tolaria if tolaria is not None else TolariaCallback()
        self.tolaria.driven_by_trainer = True
        self.add_callback(self.tolaria)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        # The Trainer divided the loss by this window's micro-batch count (or the model normalized
        # it by the window's item count): times that count, it is the per-example loss again.
        window = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        self.tolaria.judge(
            loss, last_micro_batch=self.accelerator.sync_gradients, loss_scale=float(window), state=self.state
        )
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.tolaria.governor is not None:
            logs.update(self.tolaria.run.metrics())
        super().log(logs, *args, **kwargs)


__all__ = ["TolariaCallback", "TolariaTrainer"]
