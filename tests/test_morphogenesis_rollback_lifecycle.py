"""A slot's lifecycle through a rollback when the snapshot predates the slot's current seed.

The Governor's snapshot leaves out the whole lifecycle (``_extra_state``) of non-fossilized slots,
so a rollback cannot bring back the stage a slot had at snapshot time: whatever the slot holds
at rollback time decides. A slot snapshotted while RESETTING that then becomes DORMANT and
germinates a fresh seed must come out of the rollback with that seed pruned, under a full
embargo, never silently empty (DORMANT, ``state`` None) as if nothing had been on trial.
"""

from __future__ import annotations

import math

import pytest
import torch

from tolaria.constants import DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE
from tolaria.environment import create_model
from tolaria.governor import TolariaGovernor
from tolaria.morphogenesis import CNNHost, MorphogeneticModel, SeedSlot, SeedStage
from tolaria.tasks import get_task_spec

S = SeedStage
SLOT = "r0c1"


def reach_resetting(slot: SeedSlot) -> None:
    """Germinate, prune, serve one embargo epoch, then clean the slot early: RESETTING."""
    slot.germinate("conv_light")
    assert slot.prune("policy cull") is True
    slot.step_epoch()
    assert slot.advance_stage(S.RESETTING) is True
    assert slot.state is not None and slot.seed is None and slot.stage == S.RESETTING


def assert_embargo_then_free(model: MorphogeneticModel, slot: SeedSlot) -> None:
    """Germination is refused for exactly the embargo, then allowed again."""
    for epoch in range(DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE):
        assert slot.stage in (S.PRUNED, S.EMBARGOED), epoch
        with pytest.raises(ValueError, match=rf"{slot.stage.name} -> GERMINATED"):
            model.germinate_seed("conv_heavy", slot=SLOT)
        assert slot.seed is None  # the refusal had no side effect
        model.step_epoch()
    assert slot.state is None and slot.stage == S.DORMANT and slot.seed is None
    assert model.germinate_seed("conv_heavy", slot=SLOT).stage == S.GERMINATED
    assert slot.seed is not None


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_resetting_at_snapshot_then_regerminated_ends_pruned_under_embargo(backend: str) -> None:
    torch.manual_seed(0)
    spec = get_task_spec("cifar10")
    model = create_model("cifar10", "cpu", slots=["r0c0", SLOT, "r0c2"])
    slot = model.get_slot(SLOT)
    reach_resetting(slot)

    governor = TolariaGovernor(model, snapshot_backend=backend, random_guess_loss=spec.random_guess_loss)
    info = governor.snapshot()
    assert info.committed is True
    assert f"seed_slots.{SLOT}._extra_state" in info.keys_excluded  # the lifecycle is not in the LKG

    model.step_epoch()  # the cooldown finishes
    assert slot.state is None and slot.stage == S.DORMANT
    state = model.germinate_seed("conv_light", slot=SLOT)
    new_seed_id = state.seed_id
    model.advance_seed(slot=SLOT)  # TRAINING: the seed now learns from the task gradient

    images, labels = next(spec.batches(seed=0))
    with torch.no_grad():
        for p in model.get_seed_parameters(SLOT):
            p.fill_(math.nan)  # the new graft is what goes wrong
    assert governor.check_vital_signs(spec.loss(model(images), labels).item()) is True
    report = governor.execute_rollback()

    assert report.pruned_slots == (SLOT,)
    assert slot.seed is None and slot.alpha_schedule is None
    assert slot.state is not None and slot.stage == S.PRUNED
    assert (slot.state.seed_id, slot.state.prune_initiator) == (new_seed_id, "governor")
    assert math.isfinite(spec.loss(model(images), labels).item())
    assert_embargo_then_free(model, slot)


def test_a_slot_still_resetting_at_rollback_is_left_to_finish_its_cleaning() -> None:
    model = create_model("cifar10", "cpu", slots=[SLOT])
    slot = model.get_slot(SLOT)
    reach_resetting(slot)
    governor = TolariaGovernor(model, snapshot_backend="reference")
    report = governor.execute_rollback()
    assert report.pruned_slots == () and slot.stage == S.RESETTING and slot.seed is None
    model.step_epoch()
    assert slot.state is None
    model.germinate_seed("conv_light", slot=SLOT)


# -- the slot rules that make this hold ------------------------------------------------------------


def slot_of(embargo_epochs: int = DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE) -> SeedSlot:
    model = MorphogeneticModel(CNNHost(widths=(8, 8, 8)), slots=[SLOT], embargo_epochs=embargo_epochs)
    return model.get_slot(SLOT)


def test_a_resetting_slot_finishes_its_cooldown_at_the_next_epoch() -> None:
    slot = slot_of()
    reach_resetting(slot)
    slot.step_epoch()
    assert slot.state is None and slot.stage == S.DORMANT


def test_dormant_means_empty_even_after_a_stage_assigned_by_hand() -> None:
    slot = slot_of()
    slot.germinate("conv_light")
    assert slot.state is not None
    slot.state.stage = S.RESETTING  # callers may assign stages directly
    slot.step_epoch()
    assert slot.state is None and slot.seed is None and slot.alpha_schedule is None


def test_a_seed_without_a_lifecycle_record_is_pruned_under_embargo() -> None:
    slot = slot_of(embargo_epochs=2)
    slot.germinate("conv_light")
    slot.state = None  # the record lost by hand: the seed is still there
    assert slot.prune("orphan", initiator="governor") is True
    assert slot.seed is None and slot.state is not None and slot.stage == S.PRUNED
    assert (slot.state.blueprint_id, slot.state.prune_initiator) == ("conv_light", "governor")
    slot.step_epoch()
    with pytest.raises(ValueError, match="EMBARGOED -> GERMINATED"):
        slot.germinate("conv_light")
    slot.step_epoch()
    assert slot.state is None
    slot.germinate("conv_light")


def test_a_dormant_record_in_a_state_dict_loads_as_an_empty_slot() -> None:
    slot = slot_of()
    record = {"stage": int(S.DORMANT), "seed_id": "x", "blueprint_id": "conv_light"}
    slot.set_extra_state({"version": 1, "state": record})
    assert slot.state is None and slot.seed is None
