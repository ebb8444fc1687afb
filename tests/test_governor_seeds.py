"""The Seeds contract: live seeds are left out of snapshots and pruned after a rollback."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.telemetry import TelemetryEvent, TelemetryEventType


class Stage(enum.IntEnum):
    TRAINING = 3
    FOSSILIZED = 7
    PRUNED = 8


@dataclass
class FakeState:
    stage: Stage


class FakeSlot(nn.Module):
    """The slot surface the Governor relies on: ``state.stage``, ``seed``, ``alpha_schedule``,
    ``prune(reason, *, initiator)``, plus extra state in the state dict."""

    def __init__(self, stage: Stage | None, log: list[tuple], fail_prune: bool = False) -> None:
        super().__init__()
        self.seed = nn.Linear(4, 4) if stage is not None else None
        self.alpha_schedule = nn.Module() if stage is not None else None
        if self.alpha_schedule is not None:
            self.alpha_schedule.register_buffer("alpha", torch.tensor(0.5))
        self.state = FakeState(stage) if stage is not None else None
        self.log, self.fail_prune = log, fail_prune
        self.lifecycle = {"epochs": 3}
        self.restored_extra: object = None

    def get_extra_state(self) -> object:
        return dict(self.lifecycle)

    def set_extra_state(self, state: object) -> None:
        self.restored_extra = state

    def prune(self, reason: str, *, initiator: str) -> None:
        self.log.append((self, reason, initiator))
        if self.fail_prune:
            raise RuntimeError("prune exploded")
        self.seed = None
        self.alpha_schedule = None
        self.state = FakeState(Stage.PRUNED)


class Host(nn.Module):
    def __init__(self, stages: dict[str, Stage | None], failing: tuple[str, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.log: list[tuple] = []
        self.body = nn.Linear(4, 4)
        self.seed_slots = nn.ModuleDict({k: FakeSlot(s, self.log, k in failing) for k, s in stages.items()})


def seed_keys(slot_id: str) -> set[str]:
    base = f"seed_slots.{slot_id}."
    return {base + "seed.weight", base + "seed.bias", base + "alpha_schedule.alpha", base + "_extra_state"}


def test_snapshots_leave_out_non_fossilized_seeds() -> None:
    model = Host({"live": Stage.TRAINING, "fossil": Stage.FOSSILIZED, "empty": None})
    gov = TolariaGovernor(model, snapshot_backend="reference")
    info = gov.snapshot()
    # An empty slot is not fossilized either: its lifecycle (extra state) is left out too.
    assert set(info.keys_excluded) == seed_keys("live") | {"seed_slots.empty._extra_state"}
    assert seed_keys("fossil") <= set(info.keys_captured)
    lkg = gov.last_good_state
    assert lkg is not None and not any(k.startswith("seed_slots.live.") for k in lkg)
    assert "seed_slots.fossil.seed.weight" in lkg
    assert "seed_slots.fossil._extra_state" not in lkg  # last_good_state holds tensors only


def test_rollback_restores_host_and_fossils_first_then_prunes_live_seeds(
    events: list[TelemetryEvent],
) -> None:
    model = Host({"live": Stage.TRAINING, "fossil": Stage.FOSSILIZED, "gone": Stage.PRUNED})
    model.seed_slots["gone"].seed = None
    gov = TolariaGovernor(model, snapshot_backend="reference")
    saved_body = model.body.weight.detach().clone()
    saved_fossil = model.seed_slots["fossil"].seed.weight.detach().clone()
    live_seed = model.seed_slots["live"].seed.weight
    observed: list[bool] = []
    original_prune = FakeSlot.prune

    def watching_prune(self: FakeSlot, reason: str, *, initiator: str) -> None:
        observed.append(torch.equal(model.body.weight, saved_body))  # host already restored?
        original_prune(self, reason, initiator=initiator)

    with torch.no_grad():
        model.body.weight.fill_(3.0)
        model.seed_slots["fossil"].seed.weight.fill_(4.0)
        live_seed.fill_(5.0)
    model.seed_slots["fossil"].lifecycle["epochs"] = 99
    FakeSlot.prune = watching_prune  # type: ignore[method-assign]
    try:
        report = gov.execute_rollback()
    finally:
        FakeSlot.prune = original_prune  # type: ignore[method-assign]
    assert observed == [True]
    assert torch.equal(model.body.weight, saved_body)
    assert torch.equal(model.seed_slots["fossil"].seed.weight, saved_fossil)
    assert torch.equal(live_seed, torch.full_like(live_seed, 5.0))  # never restored: it was not saved
    assert [(slot, initiator) for slot, _, initiator in model.log] == [(model.seed_slots["live"], "governor")]
    assert report.pruned_slots == ("live",) and model.seed_slots["live"].seed is None
    assert model.seed_slots["fossil"].restored_extra == {"epochs": 3}  # extra state restored, deep-copied
    assert report.missing_keys == report.unexpected_keys == ()
    assert len([e for e in events if e.event_type is TelemetryEventType.GOVERNOR_ROLLBACK]) == 1


def test_a_failing_prune_is_logged_and_the_rollback_completes(caplog: pytest.LogCaptureFixture) -> None:
    model = Host({"bad": Stage.TRAINING, "good": Stage.TRAINING}, failing=("bad",))
    gov = TolariaGovernor(model, snapshot_backend="reference")
    with caplog.at_level(logging.ERROR, logger="tolaria.governor"):
        report = gov.execute_rollback()
    assert report.rollback_occurred and report.pruned_slots == ("good",)
    assert any("bad" in r.getMessage() and r.exc_info for r in caplog.records)


def test_seed_key_changes_are_reported_but_never_raise(events: list[TelemetryEvent]) -> None:
    model = Host({"grows": Stage.TRAINING, "fossil": Stage.FOSSILIZED})
    gov = TolariaGovernor(model, snapshot_backend="reference")
    model.seed_slots["grows"].state = FakeState(Stage.FOSSILIZED)  # fossilized after the snapshot
    model.seed_slots["fossil"].seed = None  # a fossil whose module went away
    report = gov.execute_rollback()
    assert set(report.missing_keys) == seed_keys("grows")
    assert set(report.unexpected_keys) == {"seed_slots.fossil.seed.weight", "seed_slots.fossil.seed.bias"}
    (event,) = [e for e in events if e.event_type is TelemetryEventType.GOVERNOR_ROLLBACK]
    assert set(event.data.missing_keys) == seed_keys("grows")  # type: ignore[union-attr]
    assert report.pruned_slots == ()  # fossils are never pruned


def test_a_sick_seed_fossilized_after_the_snapshot_makes_the_rollback_raise() -> None:
    model = Host({"late": Stage.TRAINING})
    gov = TolariaGovernor(model, snapshot_backend="reference")  # LKG taken while "late" trains
    slot = model.seed_slots["late"]
    slot.state = FakeState(Stage.FOSSILIZED)  # fossilized after the snapshot: never captured
    with torch.no_grad():
        slot.seed.weight.fill_(float("nan"))
        model.body.weight.add_(1.0)
    saved_body = gov.last_good_state["body.weight"].clone()
    with pytest.raises(RuntimeError, match=r"\['late'\] were fossilized after the last committed snapshot"):
        gov.execute_rollback()
    assert torch.equal(model.body.weight, saved_body)  # the rest of the model was restored
    assert torch.equal(gov.last_good_state["body.weight"], saved_body)  # and the LKG is kept


def test_a_healthy_seed_fossilized_after_the_snapshot_rolls_back_cleanly() -> None:
    model = Host({"late": Stage.TRAINING})
    gov = TolariaGovernor(model, snapshot_backend="reference")
    model.seed_slots["late"].state = FakeState(Stage.FOSSILIZED)
    report = gov.execute_rollback()
    assert set(report.missing_keys) >= {"seed_slots.late.seed.weight", "seed_slots.late.seed.bias"}
    assert model.seed_slots["late"].seed is not None  # a fossil is never pruned
