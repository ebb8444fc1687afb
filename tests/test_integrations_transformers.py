"""Hugging Face's Trainer with TolariaCallback and TolariaTrainer, on real Trainers (tiny model, CPU).

A NaN written into a weight mid-run is rolled back and the run ends healthy (without tolaria the
same run ends with NaN weights while its logs look fine); with gradient accumulation the judged
loss is the per-example one; TolariaTrainer sees a gradient explosion that max_grad_norm clipping
hides from the callback; the tolaria/* keys reach the Trainer's logs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from cluster_data import CLASSES, RANDOM_GUESS, cluster_tensors, weights_finite  # noqa: E402

from tolaria.integrations.transformers import TolariaCallback, TolariaTrainer  # noqa: E402


class ClusterData(torch.utils.data.Dataset):
    """Four well-separated Gaussian clusters in 8 dimensions, as the dicts a Trainer collates."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        self.inputs, self.labels = cluster_tensors(n, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[index], "labels": self.labels[index]}


class TinyClassifier(nn.Module):
    """A 2-layer MLP that returns ``{"loss", "logits"}`` as Hugging Face models do (no download).
    ``explode``: multiply its gradients by 1e4 while the loss value stays the same."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.explode = False
        self.losses: list[float] = []  # each training forward's per-example loss

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(inputs)
        out = {"logits": logits}
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
            if self.explode:
                loss.register_hook(lambda grad: grad * 1e4)
            if self.training:
                self.losses.append(float(loss.detach()))
            out["loss"] = loss
        return out


class Faults(transformers.TrainerCallback):
    """Fault injection at the start of optimizer steps: ``nan_at`` writes a NaN into a weight,
    ``zero_at`` zeroes the output layer (a lobotomy), ``explode`` lists exploding steps."""

    def __init__(self, nan_at: int = -1, zero_at: int = -1, explode: tuple[int, ...] = ()) -> None:
        self.nan_at, self.zero_at, self.explode = nan_at, zero_at, explode

    def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
        with torch.no_grad():
            if state.global_step == self.nan_at:
                model.net[0].weight[0, 0] = math.nan
            if state.global_step == self.zero_at:
                model.net[2].weight.zero_()
                model.net[2].bias.zero_()
        model.explode = state.global_step in self.explode


def train(model: TinyClassifier, tmp_path, *, trainer_class=transformers.Trainer, max_steps: int = 30,
          callbacks: list | None = None, **options) -> transformers.Trainer:  # fmt: skip
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=max_steps, per_device_train_batch_size=32,
        lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_steps=5,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
        gradient_accumulation_steps=options.pop("gradient_accumulation_steps", 1),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = trainer_class(
        model=model, args=args, train_dataset=ClusterData(), optimizers=(optimizer, None),
        callbacks=callbacks, **options,
    )  # fmt: skip
    trainer.train()
    return trainer


def final_loss(model: TinyClassifier) -> float:
    data = ClusterData()
    model.eval()
    with torch.no_grad():
        return float(model(data.inputs, data.labels)["loss"])


def test_callback_rolls_back_a_nan_weight_and_the_run_ends_healthy_unlike_without_tolaria(tmp_path) -> None:
    unguarded = TinyClassifier()
    plain = train(unguarded, tmp_path / "plain", callbacks=[Faults(nan_at=12)])
    assert not weights_finite(unguarded)  # NaN weights, with healthy-looking logs:
    assert all(math.isfinite(entry.get("train_loss", 0.0)) for entry in plain.state.log_history)

    guarded = TinyClassifier()
    tolaria = TolariaCallback(random_guess_loss=RANDOM_GUESS, snapshot_every=5)
    trainer = train(guarded, tmp_path / "guarded", callbacks=[Faults(nan_at=12), tolaria])
    assert tolaria.rollbacks == 1 and tolaria.last_panic_reason == "governor_nan"
    assert weights_finite(guarded) and final_loss(guarded) < RANDOM_GUESS
    logged = [entry for entry in trainer.state.log_history if "tolaria/rollbacks" in entry]
    assert logged and logged[-1]["tolaria/rollbacks"] == 1.0 and logged[-1]["tolaria/last_panic"] == 12.0


@pytest.mark.parametrize("driver", ["callback", "trainer"])
def test_gradient_accumulation_is_judged_on_the_per_example_loss(tmp_path, driver: str) -> None:
    # The Trainer divides each micro-batch's loss by gradient_accumulation_steps before backward;
    # judged at that scale, a lobotomy (loss back at ln 4) would look like ln 4 / 2 and pass unseen.
    model = TinyClassifier()
    tolaria = TolariaCallback(random_guess_loss=RANDOM_GUESS, snapshot_every=2)
    faults = Faults(zero_at=15)
    if driver == "callback":
        train(model, tmp_path, callbacks=[faults, tolaria], gradient_accumulation_steps=2)
    else:
        train(model, tmp_path, trainer_class=TolariaTrainer, tolaria=tolaria, callbacks=[faults],
              gradient_accumulation_steps=2)  # fmt: skip
    assert list(tolaria.governor.loss_history)[-8:] == pytest.approx(model.losses[-8:], rel=1e-5)
    assert tolaria.rollbacks == 1 and tolaria.last_panic_reason == "governor_lobotomy"
    assert weights_finite(model) and final_loss(model) < RANDOM_GUESS


def test_only_tolaria_trainer_sees_a_gradient_explosion_that_clipping_hides(tmp_path) -> None:
    exploding = (14, 15, 16)
    seen_by_callback = TolariaCallback(random_guess_loss=RANDOM_GUESS)
    train(TinyClassifier(), tmp_path / "callback", callbacks=[Faults(explode=exploding), seen_by_callback])
    assert seen_by_callback.rollbacks == 0  # after max_grad_norm=1 clipping the norm looks ordinary

    model = TinyClassifier()
    trainer = train(model, tmp_path / "trainer", trainer_class=TolariaTrainer,
                    callbacks=[Faults(explode=exploding)],
                    tolaria=TolariaCallback(random_guess_loss=RANDOM_GUESS))  # fmt: skip
    assert trainer.tolaria.rollbacks == 1 and trainer.tolaria.last_panic_reason == "governor_grad_explosion"
    assert trainer.tolaria.last_outcome is not None
    # TolariaTrainer.log put the keys into the logs before anyone saw them.
    assert any(entry.get("tolaria/rollbacks") == 1.0 for entry in trainer.state.log_history)
    assert weights_finite(model) and final_loss(model) < RANDOM_GUESS


def test_rejects_an_option_the_governor_does_not_take() -> None:
    with pytest.raises(TypeError, match="snapshot_evry"):
        TolariaCallback(snapshot_evry=3)
