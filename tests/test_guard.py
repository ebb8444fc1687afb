"""GuardedStep: a panic rolls back without stepping, a healthy step steps, snapshots keep their schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.guard import GuardedStep, StepOutcome
from tolaria.hooks import TrainerHook
from tolaria.optim import unwrap_optimizer
from tolaria.telemetry import TelemetryEventType

# Every test runs with its events captured (the conftest fixture), asked for or not.
pytestmark = pytest.mark.usefixtures("events")


class Rig:
    """A tiny regression model under a Governor and a GuardedStep; ``step(scale)`` multiplies the
    loss by ``scale`` (NaN), ``spike`` adds a constant (the value jumps, the gradients do not) and
    ``poison`` puts an Inf into a gradient."""

    def __init__(self, snapshot_every: int = 3) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.governor = TolariaGovernor(self.model, optimizer=self.optimizer)
        self.guard = GuardedStep(
            self.governor, self.optimizer, snapshot_every=snapshot_every, track_grad_norm=True
        )
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(16, 4, generator=generator)
        self.targets = self.inputs.sum(dim=1, keepdim=True)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def step(self, scale: float = 1.0, spike: float = 0.0, poison: bool = False) -> StepOutcome:
        def closure() -> torch.Tensor:
            loss = nn.functional.mse_loss(self.model(self.inputs), self.targets) * scale + spike
            if poison:
                loss.register_hook(lambda grad: grad * math.inf)
            return loss

        return self.guard(closure)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_healthy_step_steps_the_optimizer_and_reports_loss_and_grad_norm() -> None:
    rig = Rig()
    before = rig.weights()
    outcome = rig.step()
    assert outcome.healthy and outcome.stepped and not outcome.rolled_back
    assert outcome.panic_reason is None and outcome.report is None
    assert not same(before, rig.weights())
    # The grad norm is that of the gradients the step used (they are still on the parameters).
    grads = [p.grad for p in rig.model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert outcome.grad_norm == pytest.approx(float(expected))
    assert outcome.loss > 0 and math.isfinite(outcome.loss)
    assert outcome.step_seconds >= outcome.governor_seconds >= 0


def test_blocking_steps_take_the_grad_norm_from_the_health_check(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig()
    monkeypatch.setattr(rig.guard.hook, "_grad_norm", lambda: pytest.fail("a second pass over the gradients"))
    outcome = rig.step()
    grads = [p.grad for p in rig.model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert outcome.grad_norm == pytest.approx(float(expected)) == rig.governor.last_grad_norm


def test_grad_norm_is_computed_when_the_governor_does_not_check_gradients() -> None:
    rig = Rig()
    rig.governor.check_gradients = False
    outcome = rig.step()
    assert rig.governor.last_grad_norm is None
    grads = [p.grad for p in rig.model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert outcome.grad_norm == pytest.approx(float(expected))


@pytest.mark.parametrize("deferred", [False, True], ids=["blocking", "deferred"])
def test_grad_norm_covers_the_model_even_when_the_optimizer_trains_part_of_it(deferred: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.05)
    guard = GuardedStep(
        TolariaGovernor(model, optimizer=optimizer), optimizer, track_grad_norm=True, deferred=deferred
    )
    inputs = torch.randn(16, 4)
    outcome = guard(lambda: model(inputs).pow(2).mean())
    norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
    assert outcome.grad_norm == pytest.approx(float(torch.linalg.vector_norm(norms)))


def test_nan_loss_rolls_back_to_the_last_known_good_without_backward_or_step(events) -> None:
    rig = Rig()
    lkg = rig.weights()  # the constructor's snapshot
    rig.step()
    outcome = rig.step(scale=math.nan)
    assert outcome.panic_reason == "governor_nan"
    assert outcome.rolled_back and not outcome.stepped
    assert outcome.report is not None and outcome.report.rollback_occurred
    assert outcome.rollback_seconds > 0
    assert same(lkg, rig.weights())
    assert all(p.grad is None for p in rig.model.parameters())
    assert [e.event_type for e in events].count(TelemetryEventType.GOVERNOR_ROLLBACK) == 1


def test_inf_gradient_is_caught_by_check_health_and_the_step_is_skipped() -> None:
    rig = Rig()
    lkg = rig.weights()
    outcome = rig.step(poison=True)
    assert outcome.panic_reason == "governor_nonfinite_grads"
    assert outcome.rolled_back and not outcome.stepped
    assert (
        math.isfinite(outcome.loss) and outcome.grad_norm is not None and not math.isfinite(outcome.grad_norm)
    )
    assert same(lkg, rig.weights())
    assert all(p.grad is None for p in rig.model.parameters())


def test_snapshots_every_k_healthy_steps_before_the_optimizer_step() -> None:
    rig = Rig(snapshot_every=3)
    taken = []
    for _ in range(9):
        before = rig.weights()
        outcome = rig.step()
        if outcome.snapshot is not None:
            taken.append(outcome.step)
            assert outcome.snapshot.committed is True
            # The LKG holds the weights whose loss and gradients were just checked, not the update.
            lkg = rig.governor.last_good_state
            assert lkg is not None and same(before, {k: v.clone() for k, v in lkg.items()})
    assert taken == [2, 5, 8]


def test_a_rollback_restarts_the_snapshot_count() -> None:
    rig = Rig(snapshot_every=3)
    outcomes = [rig.step(), rig.step(scale=math.nan)] + [rig.step() for _ in range(4)]
    assert outcomes[1].rolled_back
    assert [o.step for o in outcomes if o.snapshot is not None] == [4]


def test_no_snapshot_while_a_divergence_streak_is_building() -> None:
    rig = Rig(snapshot_every=1)
    for _ in range(12):  # fill the loss history past the 10 samples the statistics need
        assert rig.step().snapshot is not None
    spike = rig.step(spike=1e6)
    assert spike.anomaly_streak == 1 and spike.healthy and spike.stepped
    assert spike.snapshot is None
    # Three anomalies in a row are a divergence: rolled back.
    rig.step(spike=1e6)
    third = rig.step(spike=1e6)
    assert third.panic_reason == "governor_divergence" and third.rolled_back
    assert rig.step().snapshot is not None


def test_rejects_a_governor_that_does_not_know_the_optimizer() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer=optimizer"):
        GuardedStep(TolariaGovernor(model), optimizer)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_rejects_bad_snapshot_every(every: object) -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="snapshot_every"):
        GuardedStep(TolariaGovernor(model, optimizer=optimizer), optimizer, snapshot_every=every)  # type: ignore[arg-type]


def test_closure_must_return_a_one_element_loss() -> None:
    rig = Rig()
    with pytest.raises(TypeError, match="one-element loss"):
        rig.guard(lambda: torch.ones(3, requires_grad=True))


def test_no_snapshot_while_a_gradient_norm_streak_is_building() -> None:
    rig = Rig(snapshot_every=1)
    for _ in range(12):  # fill the gradient-norm history past the 10 samples the statistics need
        assert rig.step().snapshot is not None
    rig.optimizer.param_groups[0]["lr"] = 0.0  # the exploding gradients must not move the weights

    def exploding() -> torch.Tensor:
        loss = nn.functional.mse_loss(rig.model(rig.inputs), rig.targets)
        loss.register_hook(lambda grad: grad * 1e4)  # gradients x1e4, the loss value unchanged
        return loss

    spike = rig.guard(exploding)
    assert spike.healthy and spike.stepped and spike.snapshot is None
    assert spike.anomaly_streak == 1 and rig.governor.consecutive_panics == 0
    calm = rig.step()
    assert calm.anomaly_streak == 0 and calm.snapshot is not None


def test_blocking_panics_are_reported_at_their_own_step() -> None:
    rig = Rig()
    rig.step()
    outcome = rig.step(poison=True)
    assert outcome.rolled_back and outcome.panic_step == outcome.step == 1
    assert outcome.report is not None and outcome.report.panic_step is None  # no deferred verdict
    assert rig.step().panic_step is None


def test_deferred_steps_on_cpu_carry_the_loss_and_judge_at_once() -> None:
    rig = Rig()
    rig.guard = GuardedStep(rig.governor, rig.optimizer, snapshot_every=3, deferred=True)
    healthy = rig.step()
    assert healthy.healthy and healthy.stepped and math.isfinite(healthy.loss)
    assert list(rig.governor.loss_history) == [healthy.loss]  # judged by observe(), same monitor
    outcome = rig.step(scale=math.nan)
    assert outcome.rolled_back and (outcome.step, outcome.panic_step) == (1, 1)
    assert outcome.panic_reason == "governor_nan" and math.isnan(outcome.loss)
    assert all(p.grad is None for p in rig.model.parameters())


def test_rejects_a_non_bool_deferred() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="deferred"):
        GuardedStep(TolariaGovernor(model, optimizer=optimizer), optimizer, deferred=1)  # type: ignore[arg-type]


# -- TrainerHook: the same judging for loops that call backward and step themselves --------------


def hooked_rig(**hook_options) -> tuple[Rig, TrainerHook]:
    rig = Rig()
    return rig, TrainerHook(rig.governor, rig.optimizer, track_grad_norm=True, **hook_options)


def test_hook_judges_after_backward_and_snapshots_on_schedule() -> None:
    rig, hook = hooked_rig(snapshot_every=2)
    outcomes = []
    for _ in range(4):
        rig.optimizer.zero_grad()
        loss = nn.functional.mse_loss(rig.model(rig.inputs), rig.targets)
        loss.backward()
        outcomes.append(hook.after_backward(loss))
        rig.optimizer.step()
    assert all(o.healthy and o.stepped and not o.accumulating for o in outcomes)
    assert [o.step for o in outcomes if o.snapshot is not None] == [1, 3]
    assert outcomes[-1].grad_norm == rig.governor.last_grad_norm and outcomes[-1].grad_norm > 0


def test_hook_accumulation_judges_every_loss_per_example_and_the_gradients_once() -> None:
    rig, hook = hooked_rig(loss_scale=2.0)
    checked = []
    original = rig.governor.check_health
    rig.governor.check_health = lambda: checked.append(1) or original()  # type: ignore[method-assign]
    per_example = []
    for micro_batch in range(2):
        loss = nn.functional.mse_loss(rig.model(rig.inputs[micro_batch::2]), rig.targets[micro_batch::2])
        per_example.append(float(loss.detach()))
        (loss / 2).backward()  # the trainer divides by the accumulation count
        outcome = hook.after_backward(loss / 2, last_micro_batch=micro_batch == 1)
        assert outcome.accumulating == (micro_batch == 0) and outcome.stepped == (micro_batch == 1)
    assert list(rig.governor.loss_history) == pytest.approx(per_example)
    assert len(checked) == 1


def test_hook_rollback_clears_the_gradients_so_the_trainers_step_changes_nothing() -> None:
    rig, hook = hooked_rig()
    lkg = rig.weights()
    loss = nn.functional.mse_loss(rig.model(rig.inputs), rig.targets) * math.nan
    loss.backward()
    outcome = hook.after_backward(loss)
    assert outcome.rolled_back and outcome.panic_reason == "governor_nan" and not outcome.stepped
    rig.optimizer.step()  # the trainer steps anyway
    assert same(lkg, rig.weights())


def test_hook_without_a_loss_still_judges_weights_and_gradients() -> None:
    rig, hook = hooked_rig()
    loss = nn.functional.mse_loss(rig.model(rig.inputs), rig.targets)
    loss.register_hook(lambda grad: grad * math.inf)
    loss.backward()
    outcome = hook.after_backward(None)
    assert outcome.panic_reason == "governor_nonfinite_grads" and math.isnan(outcome.loss)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"loss_scale": 0}, ValueError, "loss_scale"),
        ({"loss_scale": math.inf}, ValueError, "loss_scale"),
        ({"snapshot_every": 0}, ValueError, "snapshot_every"),
        ({"scaler_overflow_limit": 0}, ValueError, "scaler_overflow_limit"),
        ({"scaler": object()}, TypeError, "scaler"),
    ],
)
def test_hook_rejects_bad_options(options: dict, error: type, match: str) -> None:
    rig = Rig()
    with pytest.raises(error, match=match):
        TrainerHook(rig.governor, rig.optimizer, **options)


def test_hook_rejects_a_multi_element_loss_and_deferred_micro_batches() -> None:
    rig, hook = hooked_rig()
    with pytest.raises(TypeError, match="one-element"):
        hook.after_backward(torch.ones(2))
    deferred = TrainerHook(rig.governor, rig.optimizer, deferred=True)
    with pytest.raises(ValueError, match="last_micro_batch"):
        deferred.after_backward(torch.tensor(1.0), last_micro_batch=False)


# -- wrapped optimizers: hooks and state go to the real optimizer inside ------------------------


class NeverInitialized(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer subclass whose __init__ never ran
    (no step-hook tables), proxying the real one in ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: B027 - on purpose
        self.optimizer = optimizer

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):  # type: ignore[override]
        return self.optimizer.step(closure)


class PlainWrapper:
    """Any object whose ``.optimizer`` is an optimizer (not an Optimizer itself)."""

    def __init__(self, optimizer: object) -> None:
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)  # type: ignore[attr-defined]

    def step(self) -> None:
        self.optimizer.step()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "wrap",
    [NeverInitialized, PlainWrapper, lambda o: PlainWrapper(NeverInitialized(o))],
    ids=["subclass", "plain", "both"],
)
def test_wrapped_optimizers_are_unwrapped_for_hooks_state_and_matching(wrap) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    real = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapped = wrap(real)
    governor = TolariaGovernor(model, optimizer=wrapped)
    assert governor.optimizer is real
    assert unwrap_optimizer(wrapped) is real
    guard = GuardedStep(governor, wrapped, snapshot_every=1)  # the wrapper matches the real one
    GuardedStep(governor, real)  # ... and so does the real one
    inputs = torch.randn(16, 4)
    for _ in range(2):
        assert guard(lambda: model(inputs).pow(2).mean()).stepped
    outcome = guard(lambda: model(inputs).pow(2).mean() * math.nan)
    assert outcome.rolled_back and outcome.report is not None and outcome.report.optimizer_state == "restored"
    report = governor.execute_rollback(optimizer=wrapped)
    assert governor.optimizer is real and report.optimizer_state == "restored"


def test_a_wrapper_of_another_optimizer_does_not_match_and_a_non_optimizer_is_refused() -> None:
    model = nn.Linear(2, 1)
    known = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    governor = TolariaGovernor(model, optimizer=known)
    with pytest.raises(ValueError, match="does not know this optimizer"):
        GuardedStep(governor, PlainWrapper(other))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        GuardedStep(governor, PlainWrapper("sgd"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        TolariaGovernor(model, optimizer=PlainWrapper(None))  # type: ignore[arg-type]
