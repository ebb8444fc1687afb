"""tolaria in Lightning: one callback.

::

    from tolaria.integrations.lightning import TolariaCallback

    trainer = Trainer(callbacks=[TolariaCallback(random_guess_loss=math.log(10))])

Works with ``lightning`` (``lightning.pytorch``) and with ``pytorch_lightning``; with both
installed, the callback follows the one your script imported first (and subclasses both when both
are imported). What it does, hook by hook:

* ``on_train_start``: builds the Governor on the LightningModule and the trainer's optimizer (one
  optimizer; its state is captured and restored with the weights), with the precision plugin's
  GradScaler when there is one (``precision="16-mixed"``) and ``accumulate_grad_batches`` as the
  loss scale (Lightning divides each micro-batch's loss by it before backward);
* ``on_before_backward``: keeps the micro-batch's loss (the precision plugin has scaled it by then:
  it is unscaled here);
* ``on_before_optimizer_step`` (the last micro-batch of a window, after the plugin's unscale and
  before Lightning's gradient clipping, so explosions are seen): judges the loss, the weights and
  the gradients, rolls back when sick (the step that follows changes nothing), snapshots on
  schedule; ``on_train_batch_end`` judges the loss of a micro-batch that did not step;
* logs ``tolaria/rollbacks``, ``tolaria/scaler_skips``, ``tolaria/grad_norm`` and
  ``tolaria/last_panic`` (the optimizer step of the latest rollback, -1 before any) with
  ``pl_module.log`` after each batch; the latest reason is :attr:`TolariaCallback.last_panic_reason`;
* ``state_dict``/``load_state_dict``: its counters travel in Lightning checkpoints (the Last Known
  Good itself lives in memory: a resumed run starts from a fresh snapshot).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import torch

from tolaria.hooks import DEFAULT_SCALER_OVERFLOW_LIMIT, StepOutcome
from tolaria.integrations._common import GovernedRun, RunView


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` class(es) to subclass: the trainer checks ``isinstance`` against
    its own package's, and ``lightning.pytorch`` and ``pytorch_lightning`` are separate packages."""
    imported = [name for name in ("lightning.pytorch", "pytorch_lightning") if name in sys.modules]
    if not imported:
        imported = ["lightning.pytorch" if importlib.util.find_spec("lightning") else "pytorch_lightning"]
    try:
        return tuple(importlib.import_module(name).Callback for name in imported)
    except ImportError as error:
        raise ImportError(
            "tolaria.integrations.lightning needs Lightning: pip install 'tolaria[lightning]'"
        ) from error


class TolariaCallback(RunView, *_callback_bases()):  # type: ignore[misc]
    """Watches a Lightning run with a :class:`tolaria.TolariaGovernor` (see the module docstring).

    Args:
        snapshot_every: healthy optimizer steps between snapshots (>= 1).
        scaler_overflow_limit: GradScaler overflows in a row that become a
            ``governor_scaler_overflow`` panic (fewer are skipped steps, as the scaler skips them).
        **governor_options: keyword options of :class:`tolaria.TolariaGovernor`
            (``random_guess_loss``, ``sensitivity``, ``history_window``, ``check_gradients``,
            ``recovery`` where the Governor takes a ``RecoveryPolicy``, ...).

    Raises:
        TypeError: an option the Governor does not take.
        ValueError: a count below 1; at train start, more than one optimizer.
    """

    def __init__(
        self,
        *,
        snapshot_every: int = 10,
        scaler_overflow_limit: int = DEFAULT_SCALER_OVERFLOW_LIMIT,
        **governor_options: Any,
    ) -> None:
        super().__init__()
        self.run = GovernedRun(
            "TolariaCallback", snapshot_every=snapshot_every, scaler_overflow_limit=scaler_overflow_limit,
            governor_options=governor_options,
        )  # fmt: skip
        self._pending_loss: torch.Tensor | None = None
        #: The latest step's outcome (None before the first judged step).
        self.last_outcome: StepOutcome | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(
                f"TolariaCallback watches runs with exactly one optimizer, got {len(optimizers)}"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.run.start(pl_module, optimizers[0], scaler=scaler, loss_scale=trainer.accumulate_grad_batches)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        value = loss.detach()
        scaler = self.run.hook.scaler if self.run.hook is not None else None
        if scaler is not None:  # the precision plugin scaled the loss before calling this hook
            value = value / scaler.get_scale()
        self._pending_loss = value

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        outcome = self._judge(trainer, last_micro_batch=True)
        if outcome.snapshot is not None and outcome.snapshot.committed is None and self.governor is not None:
            # Inside Lightning's closure the optimizer's step pre-hook (which orders the step after
            # an in-flight CUDA capture) has already run: resolve the capture before the step.
            self.governor.resolve_snapshot()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_loss is not None:  # a micro-batch whose backward no optimizer step followed
            self._judge(trainer, last_micro_batch=False)
        for name, value in self.run.metrics().items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def _judge(self, trainer: Any, *, last_micro_batch: bool) -> StepOutcome:
        loss, self._pending_loss = self._pending_loss, None
        outcome = self.run.judge(loss, last_micro_batch=last_micro_batch, optimizer_step=trainer.global_step)
        self.last_outcome = outcome
        return outcome

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.load_state_dict(state_dict)


__all__ = ["TolariaCallback"]
