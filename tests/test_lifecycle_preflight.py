"""preflight_lifecycle_mutation(): the Governor's veto rules for seed-lifecycle mutations, their
order (first match wins), the health snapshot every verdict carries, and name-based matching of
the host application's own enums."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum, IntEnum
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolaria.lifecycle import (
    LifecycleMutationHealthSnapshot,
    LifecycleMutationVerdict,
    preflight_lifecycle_mutation,
)
from tolaria.morphogenesis import LifecycleOp, SeedStage

Op = LifecycleOp


class ForeignOp(IntEnum):
    """The host application's own enum: another class, the same member names (other values)."""

    WAIT = 10
    GERMINATE = 11
    SET_ALPHA_TARGET = 12
    PRUNE = 13
    FOSSILIZE = 14
    ADVANCE = 15


class ForeignStage(Enum):
    TRAINING = "training"


class Curve(Enum):
    LINEAR = 0


def healthy(**overrides: Any) -> dict[str, Any]:
    """Inputs of an approvable GERMINATE, with ``overrides`` applied."""
    inputs: dict[str, Any] = dict(
        operation=Op.GERMINATE,
        slot_id="r0c1",
        blueprint_id="conv_light",
        alpha_target=None,
        alpha_speed_steps=None,
        alpha_curve=None,
        val_loss=1.25,
        val_accuracy=0.61,
        seed_stage=None,
        total_params=120_000,
        effective_seed_params=0.0,
        max_seeds=2,
        active_seed_count=1,
        cooldown_epochs_remaining=0,
        event_id="evt-42",
    )
    inputs.update(overrides)
    return inputs


def test_takes_exactly_the_fifteen_inputs_by_keyword_only() -> None:
    assert len(healthy()) == 15
    assert [f.name for f in dataclasses.fields(LifecycleMutationHealthSnapshot)] == list(healthy())
    with pytest.raises(TypeError):
        preflight_lifecycle_mutation(*healthy().values())  # type: ignore[misc]
    incomplete = healthy()
    del incomplete["event_id"]
    with pytest.raises(TypeError):
        preflight_lifecycle_mutation(**incomplete)


def test_healthy_germination_is_approved_with_its_snapshot() -> None:
    verdict = preflight_lifecycle_mutation(**healthy())
    assert (verdict.approved, verdict.reason, verdict.blocked_factor) == (True, "approved", None)
    assert verdict.health_snapshot == LifecycleMutationHealthSnapshot(
        operation="GERMINATE", slot_id="r0c1", blueprint_id="conv_light", alpha_target=None,
        alpha_speed_steps=None, alpha_curve=None, val_loss=1.25, val_accuracy=0.61, seed_stage=None,
        total_params=120_000, effective_seed_params=0.0, max_seeds=2, active_seed_count=1,
        cooldown_epochs_remaining=0, event_id="evt-42",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "factor"),
    [
        ({"val_loss": math.nan}, "val_loss_finite"),
        ({"val_loss": math.inf}, "val_loss_finite"),
        ({"val_loss": -math.inf}, "val_loss_finite"),
        ({"val_accuracy": math.nan}, "val_accuracy_finite"),
        ({"val_accuracy": math.inf}, "val_accuracy_finite"),
        ({"cooldown_epochs_remaining": -1}, "cooldown_nonnegative"),
        ({"max_seeds": 2, "active_seed_count": 3}, "active_seed_capacity"),
        ({"blueprint_id": None}, "blueprint_present"),
        ({"seed_stage": SeedStage.TRAINING}, "slot_empty_for_germination"),
        ({"operation": Op.SET_ALPHA_TARGET, "alpha_speed_steps": 5, "alpha_curve": "LINEAR"},
         "alpha_target_present"),
        ({"operation": Op.SET_ALPHA_TARGET, "alpha_target": 0.5, "alpha_curve": "LINEAR"},
         "alpha_schedule_complete"),
        ({"operation": Op.SET_ALPHA_TARGET, "alpha_target": 0.5, "alpha_speed_steps": 5},
         "alpha_schedule_complete"),
        ({"operation": Op.PRUNE, "alpha_curve": "LINEAR"}, "alpha_schedule_complete"),
        ({"operation": Op.PRUNE, "alpha_speed_steps": 5}, "alpha_schedule_complete"),
    ],
)  # fmt: skip
def test_each_rule_vetoes_with_its_factor(overrides: dict[str, Any], factor: str) -> None:
    verdict = preflight_lifecycle_mutation(**healthy(**overrides))
    assert (verdict.approved, verdict.blocked_factor) == (False, factor)
    assert verdict.health_snapshot is not None
    assert "evt-42" in verdict.reason and verdict.health_snapshot.operation in verdict.reason
    assert "r0c1" in verdict.reason


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_seeds": 0, "active_seed_count": 99},  # max_seeds <= 0: no cap
        {"max_seeds": 2, "active_seed_count": 2},  # at the cap is not over it
        {"cooldown_epochs_remaining": 3},  # a cooldown is judged by the caller, only its sign here
        {"operation": Op.SET_ALPHA_TARGET, "blueprint_id": None, "seed_stage": SeedStage.BLENDING,
         "alpha_target": 0.0, "alpha_speed_steps": 0, "alpha_curve": Curve.LINEAR},
        {"operation": Op.PRUNE, "blueprint_id": None, "seed_stage": SeedStage.TRAINING,
         "alpha_speed_steps": 4, "alpha_curve": "COSINE"},
        {"operation": Op.FOSSILIZE, "blueprint_id": None, "seed_stage": SeedStage.HOLDING},
        {"operation": Op.ADVANCE, "blueprint_id": None, "seed_stage": SeedStage.TRAINING},
        {"operation": Op.WAIT, "blueprint_id": None, "seed_stage": SeedStage.TRAINING},
        {"val_loss": 0, "val_accuracy": 100},  # ints are real numbers
    ],
)  # fmt: skip
def test_what_no_rule_covers_is_approved(overrides: dict[str, Any]) -> None:
    verdict = preflight_lifecycle_mutation(**healthy(**overrides))
    assert (verdict.approved, verdict.reason, verdict.blocked_factor) == (True, "approved", None)


def test_health_rules_come_before_the_operation_rules() -> None:
    everything_wrong = healthy(
        val_loss=math.nan, val_accuracy=math.nan, cooldown_epochs_remaining=-1, max_seeds=1,
        active_seed_count=5, blueprint_id=None, seed_stage=SeedStage.TRAINING,
    )  # fmt: skip
    order = ["val_loss", "val_accuracy", "cooldown_epochs_remaining", "active_seed_count", "blueprint_id"]
    expected = ["val_loss_finite", "val_accuracy_finite", "cooldown_nonnegative", "active_seed_capacity",
                "blueprint_present", "slot_empty_for_germination"]  # fmt: skip
    fixed = {"val_loss": 1.0, "val_accuracy": 0.5, "cooldown_epochs_remaining": 0, "active_seed_count": 0,
             "blueprint_id": "conv_light"}  # fmt: skip
    for step, factor in enumerate(expected):
        inputs = dict(everything_wrong, **{name: fixed[name] for name in order[:step]})
        assert preflight_lifecycle_mutation(**inputs).blocked_factor == factor


# -- first match wins, against an independent statement of the rules ---------------------------

OPERATIONS = st.sampled_from(
    [*Op, *ForeignOp, *(op.name for op in Op), *(op.name.lower() for op in Op), *(int(op) for op in Op)]
)
STAGES = st.one_of(
    st.none(), st.sampled_from([*SeedStage, *(stage.name for stage in SeedStage), ForeignStage.TRAINING])
)
REALS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10))


def expected_factor(i: dict[str, Any]) -> str | None:
    """The rule list, written out once more without sharing any code with tolaria.lifecycle."""
    name = i["operation"] if isinstance(i["operation"], str) else getattr(i["operation"], "name", None)
    if name is None:
        name = Op(i["operation"]).name
    name = name.upper()
    rules = [
        (not math.isfinite(i["val_loss"]), "val_loss_finite"),
        (not math.isfinite(i["val_accuracy"]), "val_accuracy_finite"),
        (i["cooldown_epochs_remaining"] < 0, "cooldown_nonnegative"),
        (i["max_seeds"] > 0 and i["active_seed_count"] > i["max_seeds"], "active_seed_capacity"),
        (name == "GERMINATE" and i["blueprint_id"] is None, "blueprint_present"),
        (name == "GERMINATE" and i["seed_stage"] is not None, "slot_empty_for_germination"),
        (name == "SET_ALPHA_TARGET" and i["alpha_target"] is None, "alpha_target_present"),
        (name in ("SET_ALPHA_TARGET", "PRUNE") and None in (i["alpha_speed_steps"], i["alpha_curve"]),
         "alpha_schedule_complete"),
    ]  # fmt: skip
    return next((factor for fired, factor in rules if fired), None)


@settings(max_examples=300, deadline=None)
@given(
    operation=OPERATIONS,
    blueprint_id=st.one_of(st.none(), st.sampled_from(["conv_light", "mlp"])),
    alpha_target=st.one_of(st.none(), st.floats(0.0, 1.0)),
    alpha_speed_steps=st.one_of(st.none(), st.integers(0, 8)),
    alpha_curve=st.one_of(st.none(), st.sampled_from(["LINEAR", Curve.LINEAR])),
    val_loss=REALS,
    val_accuracy=REALS,
    seed_stage=STAGES,
    max_seeds=st.integers(-1, 4),
    active_seed_count=st.integers(0, 6),
    cooldown_epochs_remaining=st.integers(-2, 3),
)
def test_the_first_rule_that_fires_decides(**drawn: Any) -> None:
    inputs = healthy(**drawn)
    verdict = preflight_lifecycle_mutation(**inputs)
    factor = expected_factor(inputs)
    assert verdict.blocked_factor == factor
    assert verdict.approved is (factor is None)
    if factor is None:
        assert verdict.reason == "approved"
    else:
        assert "evt-42" in verdict.reason
    assert verdict.health_snapshot is not None
    assert verdict.health_snapshot.active_seed_count == inputs["active_seed_count"]


# -- names, not classes ------------------------------------------------------------------------


def test_snapshot_stores_member_names_and_plain_values() -> None:
    verdict = preflight_lifecycle_mutation(
        **healthy(
            operation=ForeignOp.PRUNE, seed_stage=ForeignStage.TRAINING, alpha_speed_steps=3,
            alpha_curve=Curve.LINEAR, total_params=7, effective_seed_params=3, val_loss=2,
        )
    )  # fmt: skip
    snap = verdict.health_snapshot
    assert snap is not None and verdict.approved
    assert (snap.operation, snap.seed_stage, snap.alpha_curve) == ("PRUNE", "TRAINING", "LINEAR")
    assert (snap.alpha_speed_steps, snap.total_params) == (3, 7)
    assert type(snap.val_loss) is float and type(snap.effective_seed_params) is float


def test_a_foreign_enum_with_the_same_names_is_judged_like_tolarias() -> None:
    # ForeignOp.GERMINATE == 11: by value it would be nothing; by name it is a germination.
    for operation in (ForeignOp.GERMINATE, Op.GERMINATE, "GERMINATE", "germinate", 1):
        verdict = preflight_lifecycle_mutation(**healthy(operation=operation, blueprint_id=None))
        assert verdict.blocked_factor == "blueprint_present", operation
        assert verdict.health_snapshot is not None and verdict.health_snapshot.operation == "GERMINATE"
        assert "GERMINATE" in verdict.reason


def test_an_empty_slot_is_none_and_any_stage_means_occupied() -> None:
    for stage in (SeedStage.PRUNED, ForeignStage.TRAINING, "EMBARGOED", 3):
        verdict = preflight_lifecycle_mutation(**healthy(seed_stage=stage))
        assert verdict.blocked_factor == "slot_empty_for_germination"
        assert verdict.health_snapshot is not None and verdict.health_snapshot.seed_stage is not None
        assert verdict.health_snapshot.seed_stage in verdict.reason


# -- verdicts are values -----------------------------------------------------------------------


def test_verdict_and_snapshot_are_frozen() -> None:
    verdict = preflight_lifecycle_mutation(**healthy())
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.approved = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.health_snapshot.val_loss = 0.0  # type: ignore[misc, union-attr]


def test_verdict_defaults_match_the_original_contract() -> None:
    verdict = LifecycleMutationVerdict(True, "approved")
    assert (verdict.blocked_factor, verdict.health_snapshot) == (None, None)


def test_reason_names_operation_slot_and_event_id() -> None:
    verdict = preflight_lifecycle_mutation(**healthy(operation=Op.PRUNE, event_id="prop-7-proposal"))
    assert verdict.blocked_factor == "alpha_schedule_complete"
    assert "PRUNE" in verdict.reason and "'r0c1'" in verdict.reason and "prop-7-proposal" in verdict.reason


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["val_loss", "val_accuracy", "effective_seed_params", "alpha_target"])
@pytest.mark.parametrize("value", ["1.0", torch.tensor(1.0), True, None, [1.0]], ids=repr)
def test_a_non_number_is_a_type_error_naming_the_argument(argument: str, value: object) -> None:
    if value is None and argument == "alpha_target":
        return  # None means "not given" there
    with pytest.raises(TypeError, match=rf"^{argument} must be a real number"):
        preflight_lifecycle_mutation(**healthy(**{argument: value}))


@pytest.mark.parametrize(
    "argument", ["total_params", "max_seeds", "active_seed_count", "cooldown_epochs_remaining"]
)
def test_counts_must_be_ints(argument: str) -> None:
    with pytest.raises(TypeError, match=rf"^{argument} must be an int, got float"):
        preflight_lifecycle_mutation(**healthy(**{argument: 1.5}))


def test_an_operation_must_be_a_name_or_a_known_value() -> None:
    with pytest.raises(TypeError, match="^operation must be an enum member"):
        preflight_lifecycle_mutation(**healthy(operation=1.0))
    with pytest.raises(ValueError, match=r"^operation=9 is not a LifecycleOp value"):
        preflight_lifecycle_mutation(**healthy(operation=9))
