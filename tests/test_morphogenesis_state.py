"""Slot state dicts: the Governor's key layout, extra state, and restoring into slots whose
seeds differ from the saved ones (recreated, removed, rebuilt)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seed_models import advance_to, cnn_slot, tiny_cnn_model, tiny_lm_model

from tolaria.morphogenesis import (
    SEED_BEARING_STAGES,
    MorphogeneticModel,
    SeedSlot,
    SeedStage,
    SeedState,
    decode_extra_state,
)

S = SeedStage


def slot_keys(model: MorphogeneticModel) -> list[str]:
    return [k for k in model.state_dict() if k.startswith("seed_slots.")]


def test_slot_state_dict_keys_follow_the_governor_layout() -> None:
    model = tiny_cnn_model()
    model.germinate_seed("conv_heavy", slot="r0c0")
    advance_to(model.get_slot("r0c0"), S.BLENDING)
    prefixes = ("seed_slots.r0c0.seed.", "seed_slots.r0c0.alpha_schedule.")
    keys = slot_keys(model)
    assert {
        "seed_slots.r0c0._extra_state",
        "seed_slots.r0c1._extra_state",
        "seed_slots.r0c2._extra_state",
    } <= set(keys)
    assert all(k.endswith("._extra_state") or k.startswith(prefixes) for k in keys)
    assert any(k.startswith(prefixes[0]) for k in keys) and any(k.startswith(prefixes[1]) for k in keys)


def test_extra_state_is_plain_data_that_round_trips() -> None:
    slot = cnn_slot()
    assert slot.get_extra_state() == {"version": 1, "state": None, "alpha_schedule": False}
    slot.germinate("conv_light", "a-seed")
    advance_to(slot, S.BLENDING)
    slot.step_epoch()
    extra = slot.get_extra_state()
    assert json.loads(json.dumps(extra)) == extra  # plain values only: cheap to deep-copy
    assert extra["state"]["seed_id"] == "a-seed" and extra["alpha_schedule"] is True
    other = SeedSlot("r0c1", 8, "cnn")
    other.set_extra_state(copy.deepcopy(extra))
    assert other.state == SeedState(
        S.BLENDING, "a-seed", "conv_light", "r0c1", epochs_in_stage=1, epochs_total=1
    )
    assert other.seed is not None and other.alpha_schedule is not None


@pytest.mark.parametrize(("bad", "error"), [(torch.zeros(3), TypeError), ({"version": 99}, ValueError)])
def test_foreign_extra_state_is_refused(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="extra state"):
        decode_extra_state(bad)


def test_loading_a_live_seed_into_an_empty_model_recreates_it() -> None:
    source = tiny_cnn_model()
    source.germinate_seed("conv_heavy", slot="r0c2")
    advance_to(source.get_slot("r0c2"), S.HOLDING)
    with torch.no_grad():
        for p in source.get_seed_parameters("r0c2"):
            p.normal_()
    target = tiny_cnn_model()
    target.load_state_dict(source.state_dict())  # strict: every key finds a home
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))
    assert target.get_slot("r0c2").stage == S.HOLDING


def test_loading_an_empty_slot_over_a_live_seed_removes_it() -> None:
    target = tiny_cnn_model()
    target.germinate_seed("conv_light", slot="r0c0")
    advance_to(target.get_slot("r0c0"), S.BLENDING)
    target.load_state_dict(tiny_cnn_model().state_dict())
    slot = target.get_slot("r0c0")
    assert slot.state is None and slot.seed is None and slot.alpha_schedule is None


def test_a_different_blueprint_in_the_state_is_rebuilt() -> None:
    source, target = tiny_cnn_model(), tiny_cnn_model()
    source.germinate_seed("conv_heavy", slot="r0c1")
    target.germinate_seed("conv_light", slot="r0c1")
    target.load_state_dict(source.state_dict())
    assert type(target.get_slot("r0c1").seed).__name__ == "ConvHeavySeed"


def test_seeds_follow_the_model_dtype() -> None:
    model = tiny_lm_model().to(torch.float64)
    model.germinate_seed("mlp", slot="r0c1")
    assert all(p.dtype == torch.float64 for p in model.get_seed_parameters())
    assert not any("_anchor" in k for k in model.state_dict())


OPS = st.lists(st.sampled_from(["germinate", "advance", "prune", "epoch", "reload"]), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_random_lifecycles_keep_the_slot_consistent(ops: list[str]) -> None:
    slot = cnn_slot(embargo_epochs=2, blend_epochs=2)
    for op in ops:
        try:
            if op == "germinate":
                slot.germinate("conv_light")
            elif op == "advance":
                slot.advance_stage()
            elif op == "prune":
                slot.prune("random")
            elif op == "epoch":
                slot.step_epoch()
            else:
                clone = cnn_slot(embargo_epochs=2, blend_epochs=2)
                clone.load_state_dict(slot.state_dict())
                assert clone.state == slot.state
                slot = clone
        except ValueError:
            pass  # illegal moves are refused without side effects, checked below
        assert (slot.seed is not None) == (slot.stage in SEED_BEARING_STAGES)
        assert (slot.alpha_schedule is not None) == (slot.stage == S.BLENDING)
        assert slot.state is None or slot.state.stage != S.DORMANT
