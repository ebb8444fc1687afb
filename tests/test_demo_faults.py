"""tolaria.demo.faults and .results: the SPEC grammar, what each fault does, how a fault is judged."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tolaria.demo.faults import (
    FAULT_KINDS,
    FaultInjector,
    FaultSpecError,
    ScheduledFault,
    default_fault_schedule,
    first_block_weight,
    output_layer,
    parse_fault_spec,
)
from tolaria.demo.results import FaultTracker, recovery_limit
from tolaria.guard import StepOutcome
from tolaria.morphogenesis import CNNHost, MorphogeneticModel, TransformerHost

# ------------------------------------------------------------------------------------ grammar


def test_parse_spec_sorts_and_accepts_spaces_and_case() -> None:
    faults = parse_fault_spec(" lobotomy@80, NAN_WEIGHT@10 ,inf_grad@0", steps=100)
    assert faults == (
        ScheduledFault(0, "inf_grad"),
        ScheduledFault(10, "nan_weight"),
        ScheduledFault(80, "lobotomy"),
    )
    assert [str(f) for f in faults] == ["inf_grad@0", "nan_weight@10", "lobotomy@80"]


def test_default_and_none() -> None:
    assert parse_fault_spec("none", steps=50) == ()
    default = parse_fault_spec("default", steps=300)
    assert default == default_fault_schedule(300)
    assert [(f.kind, f.step) for f in default] == [
        ("nan_weight", 45),
        ("inf_grad", 90),
        ("lr_blowup", 135),
        ("lobotomy", 180),
        ("lr_storm", 210),
    ]
    assert {f.kind for f in default} == set(FAULT_KINDS)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus@3", "unknown fault kind 'bogus'"),
        ("nan_weight", "expected KIND@STEP"),
        ("nan_weight@x", "expected KIND@STEP"),
        ("nan_weight@100", r"outside the run: STEP must be in \[0, 99\]"),
        ("nan_weight@-1", "outside the run"),
        ("nan_weight@5,inf_grad@5", "two faults at step 5"),
        ("", "empty fault SPEC"),
        ("nan_weight@5,", "bad fault item ''"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        parse_fault_spec(spec, steps=100)


# ------------------------------------------------------------------------------------ injection


def cnn_model() -> MorphogeneticModel:
    torch.manual_seed(0)
    return MorphogeneticModel(CNNHost(num_classes=4, widths=(4, 8), image_size=8))


def transformer_model() -> MorphogeneticModel:
    torch.manual_seed(0)
    host = TransformerHost(vocab_size=40, context_length=8, d_model=8, n_layers=1, n_heads=2)
    return MorphogeneticModel(host)


def injector_for(model: torch.nn.Module, *faults: ScheduledFault) -> tuple[FaultInjector, torch.optim.SGD]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return FaultInjector(model, optimizer, faults, lr_blowup_factor=1000.0), optimizer


@pytest.mark.parametrize("make", [cnn_model, transformer_model])
def test_nan_weight_and_lobotomy_hit_the_tensors_every_forward_uses(make) -> None:
    model = make()
    injector, _ = injector_for(model, ScheduledFault(1, "nan_weight"), ScheduledFault(2, "lobotomy"))
    assert injector.inject(0) is None
    assert injector.inject(1) == ScheduledFault(1, "nan_weight")
    assert torch.isnan(first_block_weight(model)).sum() == 1
    injector.inject(2)
    assert all(torch.count_nonzero(p) == 0 for p in output_layer(model))


def test_lobotomy_of_a_tied_transformer_zeroes_the_shared_embedding() -> None:
    model = transformer_model()
    assert output_layer(model) == [model.host.tok_emb.weight]


def test_inf_grad_is_a_one_step_gradient_hook() -> None:
    model = cnn_model()
    injector, _ = injector_for(model, ScheduledFault(0, "inf_grad"))
    images = torch.randn(2, 3, 8, 8)
    injector.inject(0)
    model(images).sum().backward()
    weight = first_block_weight(model)
    assert weight.grad is not None and torch.isinf(weight.grad).sum() == 1
    injector.end_step()
    model.zero_grad()
    model(images).sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_lr_blowup_is_undone_by_after_rollback() -> None:
    model = cnn_model()
    injector, optimizer = injector_for(model, ScheduledFault(0, "lr_blowup"))
    assert injector.after_rollback() is False
    injector.inject(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(50.0)
    assert injector.after_rollback() is True
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


# ------------------------------------------------------------------------------------ judging


def outcome(step: int, loss: float, *, panic: str | None = None, streak: int = 0) -> StepOutcome:
    report = SimpleNamespace(rollback_occurred=True) if panic else None  # a rollback's report, as it reads
    return StepOutcome(
        step=step, loss=loss, grad_norm=None, panic_reason=panic, report=report,  # type: ignore[arg-type]
        snapshot=None, stepped=panic is None, anomaly_streak=streak, check_seconds=0.0,
        snapshot_seconds=0.0, rollback_seconds=0.002 if panic else 0.0, step_seconds=0.01,
    )  # fmt: skip


def feed(
    tracker: FaultTracker, losses: dict[int, float], panics: dict[int, str], faults: dict[int, str]
) -> None:
    for step in sorted(losses):
        if step in faults:
            tracker.on_inject(ScheduledFault(step, faults[step]))
        tracker.on_outcome(outcome(step, losses[step], panic=panics.get(step)))


def test_detected_and_recovered() -> None:
    tracker = FaultTracker(random_guess_loss=2.3, recovery_window=3)
    feed(tracker, {s: 0.5 for s in range(10)} | {5: math.nan}, {5: "governor_nan"}, {5: "nan_weight"})
    (record,) = tracker.finish()
    assert record.ok and record.detected_step == 5 and record.reason == "governor_nan"
    assert record.loss_before == pytest.approx(0.5) and record.loss_after == pytest.approx(0.5)
    assert record.rollback_ms == pytest.approx(2.0)
    assert record.failure_message() is None


def test_undetected_fault_fails_with_its_name() -> None:
    tracker = FaultTracker(random_guess_loss=2.3, recovery_window=3)
    feed(tracker, {s: 0.5 for s in range(10)}, {}, {4: "lobotomy"})
    (record,) = tracker.finish()
    assert not record.detected and not record.ok
    message = record.failure_message()
    assert message is not None and "lobotomy@4" in message and "NOT detected" in message


def test_detected_but_still_sick_is_not_recovered() -> None:
    tracker = FaultTracker(random_guess_loss=2.3, recovery_window=3)
    losses = {s: 0.2 for s in range(5)} | {s: 2.2 for s in range(5, 10)}
    feed(tracker, losses, {5: "governor_lobotomy"}, {5: "lobotomy"})
    (record,) = tracker.finish()
    assert record.detected and not record.recovered
    assert record.loss_after == pytest.approx(2.2) and record.loss_after > recovery_limit(0.2, 2.3)
    message = record.failure_message()
    assert message is not None and "did not recover" in message


def test_recovery_is_measured_from_the_last_rollback_and_a_missed_fault_is_closed_by_the_next() -> None:
    tracker = FaultTracker(random_guess_loss=2.3, recovery_window=3)
    losses = {s: 0.5 for s in range(20)}
    feed(
        tracker,
        losses,
        {6: "governor_divergence", 8: "governor_divergence"},
        {5: "lr_blowup", 14: "lobotomy"},
    )
    blowup, lobotomy = tracker.finish()
    assert blowup.ok and blowup.rollbacks == 2 and blowup.detected_step == 6
    assert not lobotomy.detected
    assert tracker.unattributed_rollbacks == []


def test_recovery_limit_is_three_quarters_of_the_way_back() -> None:
    assert recovery_limit(0.3, 2.3) == pytest.approx(0.8)
    assert recovery_limit(2.5, 2.3) == pytest.approx(2.75)  # not better than a guess: 10% slack
    assert recovery_limit(math.nan, 2.3) == pytest.approx(2.3)


def test_a_storm_holds_the_learning_rate_through_rollbacks_then_ends() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    injector = FaultInjector(model, optimizer, [ScheduledFault(3, "lr_storm")], lr_storm_factor=50.0,
                             lr_storm_steps=4)  # fmt: skip
    seen = []
    for step in range(9):
        injector.inject(step)
        if step == 4:
            assert not injector.after_rollback()  # a rollback does not end the storm
        seen.append(round(optimizer.param_groups[0]["lr"], 6))
    assert seen == [0.1, 0.1, 0.1, 5.0, 5.0, 5.0, 5.0, 0.1, 0.1]
    with pytest.raises(ValueError, match="lr_storm_steps must be an int >= 1"):
        FaultInjector(model, optimizer, [], lr_storm_steps=0)
