"""Mixed precision with a real torch.amp.GradScaler (on CPU), through GuardedStep and TrainerHook.

An overflow that the scaler skips is a skipped step, not a rollback; ``scaler_overflow_limit`` of
them in a row is a panic of its own; a NaN loss still rolls back; gradients are judged in true
units; after any of these the scaler keeps working (no "No inf checks were recorded").
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.guard import GuardedStep
from tolaria.hooks import REASON_SCALER_OVERFLOW, StepOutcome, TrainerHook
from tolaria.telemetry import TelemetryEventType

INIT_SCALE = 2.0**10


# Every test runs with its events captured (the conftest fixture), asked for or not.
pytestmark = pytest.mark.usefixtures("events")


class Rig:
    """A tiny regression model, an SGD optimizer that counts the steps it really took, a scaler
    that never grows (so every skip shows as one halving), and fp16 autocast in the forward."""

    def __init__(self, *, scaler: bool = True, **guard_options) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.unused = nn.Parameter(torch.zeros(3))  # in the model, never in the forward
        self.model.register_parameter("unused", self.unused)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.steps_applied = 0
        self.optimizer.register_step_post_hook(lambda *_: self._count())
        self.scaler = None
        if scaler:
            self.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=10_000)
        self.governor = TolariaGovernor(self.model, optimizer=self.optimizer)
        self.guard = GuardedStep(self.governor, self.optimizer, scaler=self.scaler, snapshot_every=3,
                                 track_grad_norm=True, **guard_options)  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(16, 4, generator=generator)
        self.targets = self.inputs.sum(dim=1, keepdim=True)

    def _count(self) -> None:
        self.steps_applied += 1

    def loss(self, *, overflow: bool = False, nan: bool = False) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            prediction = self.model(self.inputs)
        loss = nn.functional.mse_loss(prediction.float(), self.targets)
        if overflow:  # Inf gradients with a finite loss: what an fp16 overflow in backward looks like
            loss.register_hook(lambda grad: grad * math.inf)
        return loss * math.nan if nan else loss

    def halvings(self) -> int:
        assert self.scaler is not None
        return round(math.log2(INIT_SCALE / self.scaler.get_scale()))


def test_forced_overflows_are_skipped_steps_with_zero_rollbacks() -> None:
    rig = Rig()
    overflow_steps = {2, 5, 6, 9, 13, 14}
    outcomes = [rig.guard(lambda i=i: rig.loss(overflow=i in overflow_steps)) for i in range(17)]
    assert not any(o.rolled_back for o in outcomes)
    skipped = [o.step for o in outcomes if o.scaler_skipped]
    assert set(skipped) == overflow_steps
    assert len(skipped) == rig.halvings() == 17 - rig.steps_applied  # as many as the scaler skipped
    assert all(not o.stepped and o.healthy and o.snapshot is None for o in outcomes if o.scaler_skipped)


def test_a_nan_loss_still_rolls_back_and_the_scaler_keeps_working() -> None:
    rig = Rig()
    for _ in range(3):
        rig.guard(rig.loss)
    lkg = {k: v.clone() for k, v in rig.governor.last_good_state.items()}
    sick = rig.guard(lambda: rig.loss(nan=True))
    assert sick.rolled_back and sick.panic_reason == "governor_nan"
    assert all(torch.equal(v, rig.model.state_dict()[k]) for k, v in lkg.items())
    assert rig.guard(rig.loss).stepped  # the scaler was left consistent


def test_a_health_panic_after_the_unscale_leaves_the_scaler_ready_for_the_next_step() -> None:
    rig = Rig()
    rig.guard(rig.loss)
    with torch.no_grad():
        rig.unused[0] = math.nan  # sick weights, a finite loss: check_health panics after unscale_
    outcome = rig.guard(rig.loss)
    assert outcome.rolled_back and outcome.panic_reason == "governor_nonfinite_params"
    assert all(p.grad is None for p in rig.model.parameters())
    assert rig.guard(rig.loss).stepped  # no "unscale_() has already been called", no missing inf checks


def test_overflows_in_a_row_up_to_the_limit_are_a_panic_of_their_own(events) -> None:
    rig = Rig(scaler_overflow_limit=3)
    rig.guard(rig.loss)
    first, second, third = (rig.guard(lambda: rig.loss(overflow=True)) for _ in range(3))
    assert first.scaler_skipped and second.scaler_skipped and not (first.rolled_back or second.rolled_back)
    assert third.rolled_back and third.panic_reason == REASON_SCALER_OVERFLOW
    assert third.report is not None and third.report.panic_reason == REASON_SCALER_OVERFLOW
    rollbacks = [e for e in events if e.event_type is TelemetryEventType.GOVERNOR_ROLLBACK]
    assert [e.to_dict()["data"]["reason"] for e in rollbacks] == [REASON_SCALER_OVERFLOW]
    assert rig.guard(rig.loss).stepped and rig.guard.hook.overflow_streak == 0


def test_gradients_are_judged_in_true_units() -> None:
    plain, scaled = Rig(scaler=False), Rig()
    for _ in range(3):
        unscaled_norm = plain.guard(plain.loss).grad_norm
        scaled_norm = scaled.guard(scaled.loss).grad_norm
        assert scaled_norm == pytest.approx(unscaled_norm, rel=1e-3)  # not INIT_SCALE times larger
    history = list(scaled.governor._watch.grad_norms.history)
    assert max(history) < INIT_SCALE / 10


def test_trainer_hook_with_a_scaler_the_trainer_unscales_later() -> None:
    # The accelerate / HF Trainer order: backward of the scaled loss, the hook, then the trainer's
    # own unscale_ (inside clip_grad_norm_), step and update. The hook must leave the gradients'
    # bits as it found them and the scaler untouched.
    rig = Rig()
    assert rig.scaler is not None
    hook = TrainerHook(rig.governor, rig.optimizer, scaler=rig.scaler, track_grad_norm=True)
    plain = Rig(scaler=False)

    def trainer_step(**faults: bool) -> StepOutcome:
        rig.optimizer.zero_grad(set_to_none=True)
        loss = rig.loss(**faults)
        rig.scaler.scale(loss).backward()
        before = [None if p.grad is None else p.grad.clone() for p in rig.model.parameters()]
        outcome = hook.after_backward(loss)
        if not outcome.rolled_back:  # exactly the gradients the trainer's own unscale_ expects
            for a, p in zip(before, rig.model.parameters(), strict=True):
                if a is not None:
                    torch.testing.assert_close(p.grad, a, rtol=0, atol=0, equal_nan=True)
        rig.scaler.unscale_(rig.optimizer)
        torch.nn.utils.clip_grad_norm_(rig.model.parameters(), 1e6)
        rig.scaler.step(rig.optimizer)
        rig.scaler.update()
        return outcome

    first = trainer_step()
    assert first.stepped and first.grad_norm == pytest.approx(plain.guard(plain.loss).grad_norm, rel=1e-3)
    skipped = trainer_step(overflow=True)
    assert skipped.scaler_skipped and not skipped.rolled_back and rig.steps_applied == 1
    lkg = {k: v.clone() for k, v in rig.governor.last_good_state.items()}
    sick = trainer_step(nan=True)  # rolled back; the trainer's unscale/step/update still run cleanly
    assert sick.rolled_back and sick.panic_reason == "governor_nan" and rig.steps_applied == 1
    assert all(torch.equal(v, rig.model.state_dict()[k]) for k, v in lkg.items())  # the step changed nothing
    assert trainer_step().stepped and rig.steps_applied == 2


def test_bf16_autocast_needs_no_scaler_and_works_unchanged() -> None:
    rig = Rig(scaler=False)

    def bf16_loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = rig.model(rig.inputs)
        return nn.functional.mse_loss(prediction.float(), rig.targets)

    outcomes = [rig.guard(bf16_loss) for _ in range(4)]
    assert all(o.stepped and o.healthy for o in outcomes) and rig.steps_applied == 4


def test_a_disabled_scaler_counts_as_none() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardedStep(TolariaGovernor(model, optimizer=optimizer), optimizer,
                        scaler=torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip
    assert guard.scaler is None
    assert guard(lambda: model(torch.ones(3, 2)).pow(2).mean()).stepped


def test_rejects_a_non_scaler_and_a_deferred_scaler() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    governor = TolariaGovernor(model, optimizer=optimizer)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        GuardedStep(governor, optimizer, scaler="fp16")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="GradScaler"):
        GuardedStep(governor, optimizer, scaler=torch.amp.GradScaler("cpu"), deferred=True)
    with pytest.raises(ValueError, match="scaler_overflow_limit"):
        GuardedStep(governor, optimizer, scaler_overflow_limit=0)
