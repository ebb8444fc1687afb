"""Seed lifecycle: stages, transitions, slots, blueprints, zero-output grafts, extra state."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from seed_models import advance_to, cnn_slot, tiny_cnn_model, tiny_lm_model

from tolaria.constants import DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE
from tolaria.morphogenesis import (
    EXPERIMENTAL_STAGES,
    SEED_BEARING_STAGES,
    VALID_TRANSITIONS,
    CNNHost,
    SeedSlot,
    SeedStage,
    SeedState,
    available_blueprints,
    check_transition,
    create_seed,
    get_blueprint,
    is_valid_transition,
)

S = SeedStage
# The table, written out independently of the implementation's.
EXPECTED_EDGES = {
    (S.DORMANT, S.GERMINATED),
    (S.GERMINATED, S.TRAINING),
    (S.TRAINING, S.BLENDING),
    (S.BLENDING, S.HOLDING),
    (S.HOLDING, S.FOSSILIZED),
    (S.GERMINATED, S.PRUNED),
    (S.TRAINING, S.PRUNED),
    (S.BLENDING, S.PRUNED),
    (S.HOLDING, S.PRUNED),
    (S.PRUNED, S.EMBARGOED),
    (S.EMBARGOED, S.RESETTING),
    (S.RESETTING, S.DORMANT),
}
CNN_BLUEPRINTS = ["conv_light", "conv_heavy"]
TRANSFORMER_BLUEPRINTS = ["attention", "mlp", "lora"]


# --------------------------------------------------------------------- stages
def test_stage_values_match_the_original_substrate() -> None:
    assert {s.name: int(s) for s in SeedStage} == {
        "UNKNOWN": 0, "DORMANT": 1, "GERMINATED": 2, "TRAINING": 3, "BLENDING": 4,
        "HOLDING": 6, "FOSSILIZED": 7, "PRUNED": 8, "EMBARGOED": 9, "RESETTING": 10,
    }  # fmt: skip


@pytest.mark.parametrize("source", list(SeedStage))
@pytest.mark.parametrize("target", list(SeedStage))
def test_transition_table_is_exactly_the_specified_one(source: SeedStage, target: SeedStage) -> None:
    legal = (source, target) in EXPECTED_EDGES
    assert is_valid_transition(source, target) is legal
    if legal:
        check_transition(source, target)
    else:
        with pytest.raises(ValueError, match=f"{source.name}.*{target.name}"):
            check_transition(source, target)


def test_fossilized_is_terminal() -> None:
    assert VALID_TRANSITIONS[S.FOSSILIZED] == frozenset()


def test_seed_state_round_trips_through_a_dict() -> None:
    state = SeedState(S.BLENDING, "s1", "mlp", "r0c1", epochs_in_stage=2, epochs_total=5)
    assert SeedState.from_dict(state.to_dict()) == state
    assert SeedState.from_dict({**state.to_dict(), "added_in_a_later_version": 1}) == state


# --------------------------------------------------------------------- lifecycle
def test_germinate_registers_the_seed_under_the_seed_attribute() -> None:
    slot = cnn_slot()
    assert slot.state is None and slot.seed is None and not slot.is_active
    state = slot.germinate("conv_light", "seed-a")
    assert state is slot.state
    assert (state.stage, state.seed_id, state.blueprint_id, state.slot_id) == (
        S.GERMINATED,
        "seed-a",
        "conv_light",
        "r0c0",
    )
    assert slot.is_active and dict(slot.named_children())["seed"] is slot.seed


def test_full_lifecycle_to_fossilized() -> None:
    slot = cnn_slot()
    slot.germinate("conv_light")
    seen = []
    while slot.stage != S.FOSSILIZED:
        assert slot.advance_stage() is True
        seen.append(slot.stage)
    assert seen == [S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED]
    assert slot.alpha == 1.0 and slot.alpha_schedule is None and slot.is_active
    with pytest.raises(ValueError, match="FOSSILIZED"):
        slot.advance_stage()


@pytest.mark.parametrize(
    ("reach", "target"),
    [
        (S.GERMINATED, S.BLENDING),
        (S.TRAINING, S.FOSSILIZED),
        (S.FOSSILIZED, S.PRUNED),
        (S.HOLDING, S.TRAINING),
    ],
)
def test_illegal_advance_names_both_stages(reach: SeedStage, target: SeedStage) -> None:
    slot = cnn_slot()
    slot.germinate("conv_light")
    advance_to(slot, reach)
    with pytest.raises(ValueError, match=f"{reach.name} -> {target.name}"):
        slot.advance_stage(target)
    assert slot.stage == reach


def test_germinating_an_occupied_slot_names_both_stages() -> None:
    slot = cnn_slot()
    slot.germinate("conv_light")
    slot.advance_stage()
    with pytest.raises(ValueError, match="TRAINING -> GERMINATED"):
        slot.germinate("conv_heavy")
    assert slot.state is not None and slot.state.blueprint_id == "conv_light"


def test_advancing_an_empty_slot_raises() -> None:
    with pytest.raises(ValueError, match="germinate"):
        cnn_slot().advance_stage()


@pytest.mark.parametrize("stage", sorted(EXPERIMENTAL_STAGES))
def test_prune_removes_the_seed_and_records_why(stage: SeedStage) -> None:
    slot = cnn_slot()
    slot.germinate("conv_heavy")
    advance_to(slot, stage)
    assert slot.prune("loss went up", initiator="governor") is True
    assert slot.state is not None
    assert (slot.stage, slot.state.prune_reason, slot.state.prune_initiator) == (
        S.PRUNED,
        "loss went up",
        "governor",
    )
    assert slot.seed is None and slot.alpha_schedule is None and not slot.is_active and slot.alpha == 0.0
    assert slot.prune("again") is False


def test_prune_leaves_fossils_and_empty_slots_alone() -> None:
    slot = cnn_slot()
    assert slot.prune("nothing here") is False
    slot.germinate("conv_light")
    advance_to(slot, S.FOSSILIZED)
    assert slot.prune("no") is False
    assert slot.stage == S.FOSSILIZED and slot.seed is not None


def test_embargo_lasts_the_default_number_of_epochs_then_the_slot_is_empty() -> None:
    slot = cnn_slot()
    slot.germinate("conv_light")
    slot.prune("test")
    for _ in range(DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE - 1):
        slot.step_epoch()
        assert slot.stage in (S.PRUNED, S.EMBARGOED)
        with pytest.raises(ValueError, match="EMBARGOED -> GERMINATED"):
            slot.germinate("conv_light")
    slot.step_epoch()
    assert slot.state is None and slot.stage == S.DORMANT
    assert slot.germinate("conv_heavy").stage == S.GERMINATED


def test_blend_ramp_rises_linearly_over_blend_epochs() -> None:
    slot = cnn_slot(blend_epochs=4)
    slot.germinate("conv_light")
    advance_to(slot, S.BLENDING)
    alphas = [slot.alpha]
    for _ in range(5):
        slot.step_epoch()
        alphas.append(slot.alpha)
    assert alphas == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_strict_gates_hold_until_their_condition_is_met() -> None:
    slot = cnn_slot(permissive_gates=False, blend_epochs=2)
    slot.germinate("conv_light")
    assert slot.advance_stage() is True  # GERMINATED -> TRAINING has no gate
    assert slot.advance_stage() is False and slot.stage == S.TRAINING
    slot.step_epoch()
    assert slot.advance_stage() is True and slot.stage == S.BLENDING
    assert slot.advance_stage() is False  # blend unfinished
    slot.step_epoch()
    slot.step_epoch()
    assert slot.advance_stage() is True and slot.stage == S.HOLDING
    assert slot.advance_stage() is False
    slot.step_epoch()
    assert slot.advance_stage() is True and slot.stage == S.FOSSILIZED


# --------------------------------------------------------------------- blueprints
def test_unknown_blueprint_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="conv_heavy.*conv_light.*lora.*mlp"):
        get_blueprint("conv_giant")
    assert set(CNN_BLUEPRINTS + TRANSFORMER_BLUEPRINTS) <= set(available_blueprints())


def test_blueprint_for_the_wrong_host_kind_is_refused() -> None:
    slot = SeedSlot("r0c0", 16, "transformer")
    with pytest.raises(ValueError, match="attention.*lora.*mlp"):
        slot.germinate("conv_light")
    assert slot.state is None and slot.seed is None


@pytest.mark.parametrize(
    ("name", "kind", "shape"),
    [(n, "cnn", (2, 8, 6, 6)) for n in CNN_BLUEPRINTS]
    + [(n, "transformer", (2, 5, 16)) for n in TRANSFORMER_BLUEPRINTS],
)
def test_fresh_seeds_preserve_shape_and_output_zero(name: str, kind: str, shape: tuple[int, ...]) -> None:
    seed = create_seed(name, kind, shape[1] if kind == "cnn" else shape[-1], {"n_heads": 4})  # type: ignore[arg-type]
    out = seed(torch.randn(shape))
    assert out.shape == shape
    assert torch.count_nonzero(out) == 0


def test_attention_seed_is_causal() -> None:
    torch.manual_seed(0)
    seed = create_seed("attention", "transformer", 16, {"n_heads": 2})
    for p in seed.parameters():
        torch.nn.init.normal_(p)  # a trained seed: nonzero output everywhere
    x = torch.randn(1, 6, 16)
    changed = x.clone()
    changed[:, 4:] += torch.randn(1, 2, 16)  # not a constant shift: a LayerNorm would erase that
    before, after = seed(x), seed(changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    # ... and the positions that may see the change do: a constant-output seed would pass above.
    for position in (4, 5):
        assert not torch.allclose(before[:, position], after[:, position])


# --------------------------------------------------------------------- grafting
@pytest.mark.parametrize("blueprint", CNN_BLUEPRINTS)
@pytest.mark.parametrize("stage", sorted(SEED_BEARING_STAGES))
def test_fresh_graft_does_not_change_the_cnn_function(blueprint: str, stage: SeedStage) -> None:
    model = tiny_cnn_model().eval()
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    slot = model.get_slot("r0c1")
    slot.germinate(blueprint)
    advance_to(slot, stage)
    slot.step_epoch()  # alpha > 0 while blending
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("blueprint", TRANSFORMER_BLUEPRINTS)
def test_fresh_graft_does_not_change_the_lm_function(blueprint: str) -> None:
    model = tiny_lm_model().eval()
    tokens = torch.randint(97, (2, 12))
    before = model(tokens)
    model.germinate_seed(blueprint, slot="r0c0")
    advance_to(model.get_slot("r0c0"), S.HOLDING)
    assert torch.equal(model(tokens), before)


def test_training_stage_teaches_the_seed_without_touching_the_output_or_the_host() -> None:
    model = tiny_cnn_model()
    slot = model.get_slot("r0c0")
    slot.germinate("conv_light")
    slot.advance_stage(S.TRAINING)
    assert slot.seed is not None
    with torch.no_grad():
        for p in [*slot.seed.parameters(), *cast(CNNHost, model.host).head.parameters()]:
            p.normal_()  # a seed (and a head) that have learned something: gradients flow
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        slot.state.stage = S.GERMINATED  # type: ignore[union-attr]
        reference = model(x)
        slot.state.stage = S.TRAINING  # type: ignore[union-attr]
    out = model(x)
    assert torch.equal(out, reference)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in slot.seed.parameters())
    # The straight-through branch feeds on detached features, so the host's gradient equals
    # the gradient without the seed.
    host_grads = [p.grad.clone() for p in model.get_host_parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    slot.state.stage = S.GERMINATED  # type: ignore[union-attr]
    model(x).sum().backward()
    for with_seed, p in zip(host_grads, model.get_host_parameters(), strict=True):
        torch.testing.assert_close(with_seed, p.grad)
