"""The Governor's seed rules on real morphogenetic models (CNN and transformer hosts).

Snapshots leave out every key of non-fossilized slots (``seed.``, ``alpha_schedule.``,
``_extra_state``) and keep fossils; a rollback restores host and fossils, then prunes every
live seed with initiator "governor"; seeds germinated or culled after the snapshot roll back
cleanly. (tests/test_governor_seeds.py checks the same contract against stand-in slots.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import pytest
import torch

from tolaria.constants import DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE
from tolaria.environment import create_model
from tolaria.governor import TolariaGovernor
from tolaria.morphogenesis import (
    EXPERIMENTAL_STAGES,
    CNNHost,
    MorphogeneticModel,
    SeedStage,
    TransformerHost,
)
from tolaria.tasks import get_task_spec

S = SeedStage
ALL_SLOTS = ["r0c0", "r0c1", "r0c2"]


def grow(model: MorphogeneticModel, slot: str, blueprint: str, stage: SeedStage) -> None:
    """Germinate ``blueprint`` in ``slot`` and walk it forward to ``stage``."""
    model.germinate_seed(blueprint, slot=slot)
    while model.get_slot(slot).stage != stage:
        model.advance_seed(slot=slot)


def slot_keys(keys: Iterable[str], slot: str) -> list[str]:
    return [k for k in keys if k.startswith(f"seed_slots.{slot}.")]


def randomize(tensors: Iterable[torch.Tensor]) -> None:
    with torch.no_grad():
        for t in tensors:
            t.normal_()


def cnn_model() -> MorphogeneticModel:
    torch.manual_seed(0)
    model = create_model("cifar10", "cpu", slots=ALL_SLOTS)
    randomize(cast(CNNHost, model.host).head.parameters())  # outputs depend strongly on features
    return model


def poison(model: MorphogeneticModel) -> None:
    """A catastrophic step: NaN in every parameter, host and seeds alike."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)


def clone_state(model: MorphogeneticModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("live_stage", sorted(EXPERIMENTAL_STAGES), ids=lambda stage: stage.name)
def test_snapshot_leaves_out_live_seeds_and_keeps_fossils(live_stage: SeedStage) -> None:
    model = cnn_model()
    grow(model, "r0c0", "conv_light", live_stage)
    grow(model, "r0c1", "conv_heavy", S.FOSSILIZED)  # r0c2 stays empty
    info = TolariaGovernor(model).snapshot()
    captured, excluded = set(info.keys_captured), set(info.keys_excluded)
    assert slot_keys(captured, "r0c0") == [] and slot_keys(captured, "r0c2") == []
    assert set(slot_keys(model.state_dict(), "r0c0")) <= excluded
    assert {"seed_slots.r0c0._extra_state", "seed_slots.r0c2._extra_state"} <= excluded
    fossil_keys = slot_keys(model.state_dict(), "r0c1")
    assert any(".seed." in k for k in fossil_keys) and set(fossil_keys) <= captured
    assert {k for k in model.state_dict() if not k.startswith("seed_slots.")} <= captured


def test_blending_seed_schedule_is_left_out_too() -> None:
    model = cnn_model()
    grow(model, "r0c2", "conv_heavy", S.BLENDING)
    governor = TolariaGovernor(model)
    assert any(".alpha_schedule." in k for k in slot_keys(model.state_dict(), "r0c2"))
    assert slot_keys(governor.snapshot().keys_captured, "r0c2") == []
    lkg = governor.last_good_state
    assert lkg is not None and slot_keys(lkg, "r0c2") == []


def test_rollback_restores_host_and_fossils_then_prunes_live_seeds() -> None:
    model = cnn_model()
    grow(model, "r0c0", "conv_light", S.BLENDING)
    grow(model, "r0c1", "conv_heavy", S.FOSSILIZED)
    randomize(model.get_seed_parameters())
    fossil_params = list(model.get_seed_parameters("r0c1"))
    governor = TolariaGovernor(model)
    saved = {k: v for k, v in clone_state(model).items() if not k.startswith("seed_slots.r0c0.")}

    poison(model)
    assert governor.check_vital_signs(float("nan")) is True
    report = governor.execute_rollback()

    outcome = (report.panic_reason, report.rollback_occurred, report.pruned_slots)
    assert outcome == ("governor_nan", True, ("r0c0",))
    restored = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    assert list(model.get_seed_parameters("r0c1")) == fossil_params  # same Parameter objects
    live = model.get_slot("r0c0")
    assert live.state is not None
    assert (live.stage, live.state.prune_initiator, live.seed) == (S.PRUNED, "governor", None)
    assert model.get_slot("r0c1").stage == S.FOSSILIZED
    assert (model.count_active_seeds(), model.count_fossilized_seeds()) == (0, 1)


def test_pruned_slot_is_empty_again_after_the_embargo() -> None:
    model = cnn_model()
    grow(model, "r0c1", "conv_light", S.TRAINING)
    governor = TolariaGovernor(model)
    governor.execute_rollback()
    slot = model.get_slot("r0c1")
    for _ in range(DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE - 1):
        model.step_epoch()
        assert slot.stage in (S.PRUNED, S.EMBARGOED)
    model.step_epoch()
    assert slot.state is None
    model.germinate_seed("conv_heavy", slot="r0c1")  # the slot can grow again


def test_seed_culled_after_the_snapshot_rolls_back_cleanly() -> None:
    model = cnn_model()
    grow(model, "r0c0", "conv_heavy", S.HOLDING)
    governor = TolariaGovernor(model)
    saved = clone_state(model)
    assert model.prune_seed(slot="r0c0", reason="policy cull") is True
    poison(model)
    report = governor.execute_rollback()
    assert report.pruned_slots == ()  # nothing live was left to prune
    assert all(k.startswith("seed_slots.") for k in report.missing_keys + report.unexpected_keys)
    restored = model.state_dict()
    for key in (k for k in saved if not k.startswith("seed_slots.")):
        assert torch.equal(restored[key], saved[key]), key
    slot = model.get_slot("r0c0")
    assert slot.state is not None and slot.state.prune_initiator == "policy" and slot.seed is None


def test_seed_germinated_after_the_snapshot_rolls_back_cleanly() -> None:
    model = cnn_model().eval()
    images = torch.randn(4, 3, 32, 32)
    governor = TolariaGovernor(model)
    before = model(images)
    grow(model, "r0c2", "conv_light", S.BLENDING)
    model.step_epoch()
    randomize(model.get_seed_parameters("r0c2"))
    assert not torch.equal(model(images), before)  # the graft has changed the function
    poison(model)
    report = governor.execute_rollback()
    assert report.pruned_slots == ("r0c2",)
    assert model.get_slot("r0c2").stage == S.PRUNED
    assert torch.equal(model(images), before)  # the function from snapshot time, exactly


def test_directly_set_fossilized_stage_is_honoured_by_the_next_snapshot() -> None:
    model = cnn_model()
    grow(model, "r0c1", "conv_light", S.TRAINING)
    randomize(model.get_seed_parameters("r0c1"))
    governor = TolariaGovernor(model)
    assert slot_keys(governor.snapshot().keys_captured, "r0c1") == []
    state = model.get_slot("r0c1").state
    assert state is not None
    state.stage = S.FOSSILIZED
    info = governor.snapshot()
    assert "seed_slots.r0c1._extra_state" in info.keys_captured
    assert any(k.startswith("seed_slots.r0c1.seed.") for k in info.keys_captured)
    saved = [p.detach().clone() for p in model.get_seed_parameters("r0c1")]
    poison(model)
    report = governor.execute_rollback()
    assert report.pruned_slots == ()
    assert model.get_slot("r0c1").stage == S.FOSSILIZED
    for before, after in zip(saved, model.get_seed_parameters("r0c1"), strict=True):
        assert torch.equal(before, after)


def test_transformer_seeds_follow_the_same_rules() -> None:
    torch.manual_seed(0)
    host = TransformerHost(vocab_size=211, context_length=16, d_model=32, n_layers=3, n_heads=4)
    model = MorphogeneticModel(host, slots=["r0c0", "r0c1", "r0c2"]).eval()
    grow(model, "r0c0", "lora", S.FOSSILIZED)
    grow(model, "r0c1", "attention", S.BLENDING)
    grow(model, "r0c2", "mlp", S.GERMINATED)
    randomize(model.get_seed_parameters("r0c0"))
    tokens = torch.randint(211, (2, 16))
    governor = TolariaGovernor(model, random_guess_loss=math.log(211))
    captured = governor.snapshot().keys_captured
    assert slot_keys(captured, "r0c1") == [] and slot_keys(captured, "r0c2") == []
    assert "seed_slots.r0c0._extra_state" in captured
    # The live seeds contribute nothing yet (r0c1 is at alpha 0), so this is also the
    # function of the model without them.
    expected = model(tokens)
    poison(model)
    report = governor.execute_rollback()
    assert set(report.pruned_slots) == {"r0c1", "r0c2"}
    assert torch.equal(model(tokens), expected)


def test_training_loop_with_a_mid_run_graft_recovers_from_a_fault() -> None:
    torch.manual_seed(0)
    spec = get_task_spec("cifar10")
    model = create_model("cifar10", "cpu", slots=["r0c1"])
    optimizer = torch.optim.SGD(model.get_host_parameters(), lr=spec.learning_rate, momentum=spec.momentum)
    governor = TolariaGovernor(model, optimizer=optimizer, random_guess_loss=spec.random_guess_loss)
    batches = spec.batches(seed=0)

    def step() -> float:
        images, labels = next(batches)
        loss = spec.loss(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step() for _ in range(8)]
    governor.snapshot()
    grow(model, "r0c1", "conv_light", S.TRAINING)
    optimizer.add_param_group({"params": list(model.get_seed_parameters("r0c1"))})
    step()
    poison(model)
    assert governor.check_vital_signs(step()) is True  # NaN weights: NaN loss
    report = governor.execute_rollback()
    assert report.pruned_slots == ("r0c1",)
    after = [step() for _ in range(8)]
    assert all(math.isfinite(loss) for loss in after)
    assert min(after) < losses[-1]  # training resumes from the LKG and keeps improving
