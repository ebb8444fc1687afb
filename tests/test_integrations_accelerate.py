"""accelerate with TolariaHook and GuardedStep, on a real Accelerator (tiny model, CPU, few steps).

The Governor takes accelerate's AcceleratedOptimizer (which never ran Optimizer.__init__); a NaN
written into a weight mid-run is rolled back and the run ends healthy (without tolaria it ends
with NaN weights); inside ``accelerator.accumulate`` the loss is judged per example and the
gradients once per window; the counters go out through ``accelerator.log``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from accelerate.tracking import GeneralTracker  # noqa: E402
from cluster_data import CLASSES, RANDOM_GUESS, cluster_data, final_loss, weights_finite  # noqa: E402

from tolaria import GuardedStep, TolariaGovernor  # noqa: E402
from tolaria.integrations.accelerate import TolariaHook  # noqa: E402


class MemoryTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given (a real tracker, in memory)."""

    name = "memory"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict] = []

    @property
    def tracker(self) -> list[dict]:
        return self.logged

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append(dict(values))


def prepared(**accelerator_options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_options)
    loader = torch.utils.data.DataLoader(cluster_data(), batch_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader


def train(accelerator, model, optimizer, loader, *, hook: TolariaHook | None, epochs: int = 4,
          nan_at: int = -1, zero_at: int = -1) -> list[float]:  # fmt: skip
    """The README's loop with fault injection before micro-batch ``nan_at`` (a NaN weight) and
    ``zero_at`` (the output layer zeroed); returns each micro-batch's loss."""
    losses, seen = [], 0
    for _ in range(epochs):
        for inputs, labels in loader:
            with torch.no_grad():
                if seen == nan_at:
                    accelerator.unwrap_model(model)[0].weight[0, 0] = math.nan
                if seen == zero_at:
                    accelerator.unwrap_model(model)[2].weight.zero_()
                    accelerator.unwrap_model(model)[2].bias.zero_()
            seen += 1
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(inputs), labels)
                losses.append(float(loss.detach()))
                accelerator.backward(loss)
                if hook is not None:
                    hook.after_backward(loss)
                optimizer.step()
                optimizer.zero_grad()
    return losses


def test_the_governor_and_guarded_step_take_accelerates_optimizer_and_backward() -> None:
    accelerator, model, optimizer, loader = prepared()
    assert isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer)
    governor = TolariaGovernor(model, optimizer=optimizer)
    assert governor.optimizer is optimizer.optimizer  # hooks and state live on the real optimizer
    guard = GuardedStep(governor, optimizer, backward=accelerator.backward, snapshot_every=1)
    inputs, labels = next(iter(loader))
    for _ in range(2):  # the second snapshot holds the first step's momentum buffers
        healthy = guard(lambda: nn.functional.cross_entropy(model(inputs), labels))
        assert healthy.stepped and healthy.snapshot is not None
    sick = guard(lambda: nn.functional.cross_entropy(model(inputs), labels) * math.nan)
    assert sick.rolled_back and sick.report is not None and sick.report.optimizer_state == "restored"


def test_a_nan_weight_is_rolled_back_and_the_run_ends_healthy_unlike_without_tolaria() -> None:
    unguarded = prepared()
    train(*unguarded, hook=None, nan_at=12)
    assert not weights_finite(unguarded[1])

    accelerator, model, optimizer, loader = prepared(log_with=[MemoryTracker()])
    accelerator.init_trackers("tolaria-test")
    hook = TolariaHook(accelerator, model, optimizer, random_guess_loss=RANDOM_GUESS, snapshot_every=5)
    train(accelerator, model, optimizer, loader, hook=hook, nan_at=12)
    assert hook.rollbacks == 1 and hook.last_panic_reason == "governor_nan"
    assert weights_finite(model) and final_loss(model) < RANDOM_GUESS
    logged = accelerator.get_tracker("memory").tracker
    assert len(logged) == hook.optimizer_steps == 32
    assert logged[-1]["tolaria/rollbacks"] == 1.0 and logged[-1]["tolaria/last_panic"] == 12.0
    assert math.isfinite(logged[-1]["tolaria/grad_norm"])


def test_accumulation_judges_the_per_example_loss_and_the_gradients_once_per_window() -> None:
    # accelerator.backward divides the loss by the accumulation count inside; the loss the user
    # holds, and the one judged, is the per-example loss: a lobotomy (loss back at ln 4) is caught.
    accelerator, model, optimizer, loader = prepared(gradient_accumulation_steps=2)
    hook = TolariaHook(accelerator, model, optimizer, random_guess_loss=RANDOM_GUESS, snapshot_every=2)
    judged_gradients = []
    original = hook.governor.check_health
    hook.governor.check_health = lambda: judged_gradients.append(1) or original()
    losses = train(accelerator, model, optimizer, loader, hook=hook, epochs=3, zero_at=17)
    assert len(judged_gradients) < len(losses)  # once per window (minus the rolled-back loss panics)
    assert hook.optimizer_steps == len(losses) // 2
    healthy = [loss for index, loss in enumerate(losses) if index != 17]  # a panic never enters the history
    assert list(hook.governor.loss_history)[-8:] == pytest.approx(healthy[-8:], rel=1e-5)
    assert hook.rollbacks == 1 and hook.last_panic_reason == "governor_lobotomy"
    assert final_loss(model) < RANDOM_GUESS


def test_governor_options_pass_through_and_unknown_ones_are_refused() -> None:
    from tolaria import RecoveryPolicy

    accelerator, model, optimizer, _ = prepared()
    policy = RecoveryPolicy()
    hook = TolariaHook(accelerator, model, optimizer, recovery=policy, sensitivity=4.0, log=False)
    assert hook.governor.recovery is policy and hook.governor.sensitivity == 4.0
    with pytest.raises(TypeError, match="model"):
        TolariaHook(accelerator, model, optimizer, model=model)
    with pytest.raises(TypeError, match="accelerate.Accelerator"):
        TolariaHook(object(), model, optimizer)  # type: ignore[arg-type]
