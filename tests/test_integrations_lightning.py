"""Lightning with TolariaCallback, on real Lightning trainers (tiny model, CPU, few steps).

A NaN written into a weight mid-run is rolled back and the run ends healthy (without tolaria the
same run ends with NaN weights); gradient accumulation is judged on the per-example scale (a real
lobotomy is caught, which the divided loss would hide); a GradScaler run skips its overflow steps
without a rollback; counters log through ``pl_module.log`` and travel in ``state_dict``.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from cluster_data import CLASSES, RANDOM_GUESS, cluster_data, final_loss, weights_finite  # noqa: E402

from tolaria.integrations.lightning import TolariaCallback  # noqa: E402


class TinyClassifier(pl.LightningModule):
    """A 2-layer MLP; ``inf_grad_batches`` get Inf gradients (a GradScaler overflow) while their
    loss stays finite, ``nan_loss_batches`` a NaN loss."""

    def __init__(self, inf_grad_batches: tuple[int, ...] = (), nan_loss_batches: tuple[int, ...] = ()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.inf_grad_batches = inf_grad_batches
        self.nan_loss_batches = nan_loss_batches
        self.batches_seen = 0
        self.losses: list[float] = []  # each micro-batch's per-example loss, as the model computed it

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs).float(), labels)
        if self.batches_seen in self.inf_grad_batches:
            loss.register_hook(lambda grad: grad * math.inf)
        if self.batches_seen in self.nan_loss_batches:
            loss = loss * math.nan
        self.losses.append(float(loss.detach()))
        self.batches_seen += 1
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class WriteNanIntoWeight(pl.Callback):
    """Fault injection: a NaN in the first layer's weight before the batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.batches_seen == self.at:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = math.nan


class ZeroOutputLayer(pl.Callback):
    """Fault injection: a lobotomy (the output layer zeroed: every prediction is uniform) at batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.batches_seen == self.at:
            with torch.no_grad():
                pl_module.net[2].weight.zero_()
                pl_module.net[2].bias.zero_()


def fit(model: TinyClassifier, callbacks: list, *, max_steps: int = 30, **trainer_options) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **trainer_options,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(cluster_data(), batch_size=32, shuffle=False)
    trainer.fit(model, loader)
    return trainer


def test_a_nan_weight_is_rolled_back_and_the_run_ends_healthy_unlike_without_tolaria() -> None:
    unguarded = TinyClassifier()
    fit(unguarded, [WriteNanIntoWeight(at=12)])
    assert not weights_finite(unguarded)  # without tolaria the NaN spreads through every weight

    guarded = TinyClassifier()
    tolaria = TolariaCallback(random_guess_loss=RANDOM_GUESS, snapshot_every=5)
    trainer = fit(guarded, [WriteNanIntoWeight(at=12), tolaria])
    assert tolaria.rollbacks == 1 and tolaria.last_panic_reason == "governor_nan"
    assert weights_finite(guarded)
    assert final_loss(guarded) < RANDOM_GUESS
    # The counters went through pl_module.log.
    assert float(trainer.callback_metrics["tolaria/rollbacks"]) == 1.0
    assert float(trainer.callback_metrics["tolaria/last_panic"]) == 12.0
    assert math.isfinite(float(trainer.callback_metrics["tolaria/grad_norm"]))
    # ... and travel in checkpoints.
    restored = TolariaCallback()
    restored.load_state_dict(tolaria.state_dict())
    assert restored.rollbacks == 1 and restored.last_panic_reason == "governor_nan"


def test_gradient_accumulation_is_judged_on_the_per_example_loss() -> None:
    # Lightning divides each micro-batch's loss by accumulate_grad_batches before backward; judged
    # at that scale, a lobotomy (loss back at ln 4) would look like ln 4 / 2 and pass unseen.
    model = TinyClassifier()
    tolaria = TolariaCallback(random_guess_loss=RANDOM_GUESS, snapshot_every=2)
    fit(model, [ZeroOutputLayer(at=40), tolaria], max_steps=30, accumulate_grad_batches=2)
    # Every micro-batch's loss was judged, at the scale the model computed it.
    assert list(tolaria.governor.loss_history)[-8:] == pytest.approx(model.losses[-8:], rel=1e-5)
    assert tolaria.rollbacks == 1 and tolaria.last_panic_reason == "governor_lobotomy"
    assert final_loss(model) < RANDOM_GUESS


def test_gradscaler_overflows_are_skipped_steps_and_a_nan_loss_still_rolls_back() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    overflows = (6, 11, 12)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10_000)
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model = TinyClassifier(inf_grad_batches=overflows, nan_loss_batches=(20,))
    tolaria = TolariaCallback(random_guess_loss=RANDOM_GUESS, snapshot_every=5)
    fit(model, [tolaria], max_steps=26, plugins=[precision])
    # Every skip halves the scale: the scaler skipped the overflows and the NaN step (rolled back).
    skipped_by_scaler = round(math.log2(2.0**12 / scaler.get_scale()))
    assert tolaria.scaler_skips == len(overflows) == skipped_by_scaler - 1
    assert tolaria.rollbacks == 1 and tolaria.last_panic_reason == "governor_nan"
    assert weights_finite(model) and final_loss(model) < RANDOM_GUESS


def test_works_under_the_pytorch_lightning_package_name() -> None:
    script = (
        "import pytorch_lightning as pl\n"
        "from tolaria.integrations.lightning import TolariaCallback\n"
        "callback = TolariaCallback()\n"
        "assert isinstance(callback, pl.Callback)\n"
        "pl.Trainer(accelerator='cpu', callbacks=[callback], logger=False, enable_checkpointing=False)\n"
    )
    pytest.importorskip("pytorch_lightning")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)


def test_rejects_an_option_the_governor_does_not_take() -> None:
    with pytest.raises(TypeError, match="random_guess_los"):
        TolariaCallback(random_guess_los=1.0)


def test_lightning_optimizer_wrappers_unwrap_to_the_real_optimizer() -> None:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from tolaria import GuardedStep, TolariaGovernor

    model = nn.Linear(2, 1)
    real = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = LightningOptimizer(real)
    governor = TolariaGovernor(model, optimizer=wrapped)
    assert governor.optimizer is real  # its step hook and its state are the real optimizer's
    GuardedStep(governor, wrapped)  # matched through the wrapper (stepping it needs a Trainer)
    assert governor.execute_rollback(optimizer=wrapped).rollback_occurred
