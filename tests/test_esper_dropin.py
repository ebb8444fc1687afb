"""Drop-in inside esper-lite as it is today: the Governor contract its tests and trainer rely on.

Each test names the clause of the contract it pins (report reason, check_vital_signs keyword,
panic state, pre-flight, attribution fields, last_good_state edits, stderr warnings, sinks,
errors, GovernorProtocol)."""

from __future__ import annotations

import math
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tolaria
import tolaria.governor as governor_module
from tolaria import telemetry
from tolaria.governor import TolariaGovernor
from tolaria.morphogenesis import LifecycleOp
from tolaria.telemetry import TelemetryEvent, TelemetryEventType

BACKENDS = ("reference", "native")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def governor(backend: str = "reference", **kwargs: Any) -> TolariaGovernor:
    return TolariaGovernor(model(), snapshot_backend=backend, **kwargs)


def warm(gov: TolariaGovernor, n: int = 12, loss: float = 1.0) -> None:
    for i in range(n):
        assert not gov.check_vital_signs(loss + 0.01 * (i % 3))


def rollbacks(events: list[TelemetryEvent]) -> list[Any]:
    return [e.data for e in events if e.event_type is TelemetryEventType.GOVERNOR_ROLLBACK]


# -- 1. report reason ------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["nan", "lobotomy", "divergence", "nonfinite_params", "manual"])
def test_every_rollback_reports_structural_collapse_and_keeps_the_code_apart(
    fault: str, events: list[TelemetryEvent]
) -> None:
    gov = governor()
    warm(gov, loss=0.2)
    if fault == "nan":
        assert gov.check_vital_signs(math.nan)
    elif fault == "lobotomy":
        assert gov.check_vital_signs(math.log(10))
    elif fault == "divergence":
        assert [gov.check_vital_signs(500.0) for _ in range(3)] == [False, False, True]
    elif fault == "nonfinite_params":
        with torch.no_grad():
            gov.model[0].weight[0, 0] = math.inf  # type: ignore[index]
        assert gov.check_health()
    report = gov.execute_rollback()
    expected = None if fault == "manual" else f"governor_{fault}"
    assert report.reason == "Structural Collapse" and report.panic_reason == expected
    (payload,) = rollbacks(events)
    assert payload.panic_reason == expected
    assert payload.reason == (expected or "governor_manual_rollback")


# -- 2. check_vital_signs(current_loss) -------------------------------------------------------
def test_check_vital_signs_takes_current_loss_by_keyword_and_by_position() -> None:
    gov = governor()
    assert not gov.check_vital_signs(current_loss=1.0)
    assert not gov.check_vital_signs(1.0)
    assert gov.check_vital_signs(current_loss=torch.tensor(math.nan))


# -- 3. the panic state esper reads and writes ------------------------------------------------
def test_nan_and_lobotomy_set_the_state_and_leave_the_count_alone() -> None:
    gov = governor()
    warm(gov, loss=0.2)
    assert [gov.check_vital_signs(500.0) for _ in range(2)] == [False, False]  # a run of two
    assert gov.check_vital_signs(math.inf)
    assert (gov._pending_panic, gov._panic_loss, gov._panic_reason) == (False, math.inf, "governor_nan")
    assert gov.consecutive_panics == 2
    assert gov.check_vital_signs(math.log(10))
    assert (gov._pending_panic, gov._panic_reason) == (False, "governor_lobotomy")
    assert gov._panic_loss == pytest.approx(math.log(10)) and gov.consecutive_panics == 2


def test_a_divergence_anomaly_is_pending_before_it_panics_and_a_normal_sample_clears_all() -> None:
    gov = governor()
    warm(gov)
    assert not gov.check_vital_signs(400.0)
    assert (gov._pending_panic, gov._panic_loss, gov._panic_reason) == (True, 400.0, "governor_divergence")
    assert gov.consecutive_panics == 1
    assert not gov.check_vital_signs(1.0)
    assert (gov._pending_panic, gov._panic_loss, gov._panic_reason, gov.consecutive_panics) == (
        False, None, None, 0,
    )  # fmt: skip


def test_a_warm_up_sample_only_clears_the_reason() -> None:
    gov = governor()
    gov._panic_reason, gov._panic_loss, gov._pending_panic = "governor_divergence", 7.0, True
    assert not gov.check_vital_signs(1.0)  # history of 1 < 10
    assert (gov._panic_reason, gov._panic_loss, gov._pending_panic) == (None, 7.0, True)


def test_writes_to_the_panic_state_change_what_the_rollback_reports(events: list[TelemetryEvent]) -> None:
    gov = governor()
    warm(gov)
    gov._panic_reason, gov._panic_loss, gov._pending_panic = "governor_lobotomy", 3.25, True
    report = gov.execute_rollback()
    assert (report.panic_reason, report.loss_at_panic) == ("governor_lobotomy", 3.25)
    assert (gov._panic_reason, gov._panic_loss, gov._pending_panic, gov.consecutive_panics) == (
        None, None, False, 0,
    )  # fmt: skip
    assert rollbacks(events)[0].loss_at_panic == 3.25
    again = gov.execute_rollback()
    assert again.panic_reason is None and math.isnan(again.loss_at_panic)


def test_a_health_panic_sets_the_reason_and_its_event_carries_the_steps_loss(
    events: list[TelemetryEvent],
) -> None:
    gov = governor()
    warm(gov)
    assert not gov.check_vital_signs(1.5)
    with torch.no_grad():
        gov.model[2].bias[0] = math.nan  # type: ignore[index]
    assert gov.check_health()
    assert gov._panic_reason == "governor_nonfinite_params"
    panic = [e.data for e in events if e.event_type is TelemetryEventType.GOVERNOR_PANIC][-1]
    assert panic.loss == 1.5  # type: ignore[union-attr]
    assert math.isnan(gov.execute_rollback().loss_at_panic)  # no loss panic: NaN, as before


class OriginalState:
    """An independent model of the original Governor's loss rules and panic state."""

    def __init__(self, min_panics: int = 3, guess: float = math.log(10)) -> None:
        self.history: list[float] = []
        self.consecutive = 0
        self.reason: str | None = None
        self.loss: float | None = None
        self.pending = False
        self.min_panics, self.guess = min_panics, guess

    def check(self, loss: float) -> bool:
        if not math.isfinite(loss):
            self.pending, self.loss, self.reason = False, loss, "governor_nan"
            return True
        if len(self.history) < 10:
            self.history = (self.history + [loss])[-20:]
            self.reason = None
            return False
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        if mean < 0.6 * self.guess and abs(loss - self.guess) < 0.065 * self.guess:
            self.pending, self.loss, self.reason = False, loss, "governor_lobotomy"
            return True
        if loss > 12.0 and loss > mean + 6.0 * std and loss > 3.0 * mean:
            self.consecutive += 1
            self.pending, self.loss, self.reason = True, loss, "governor_divergence"
            return self.consecutive >= self.min_panics
        self.history = (self.history + [loss])[-20:]
        self.pending, self.loss, self.reason, self.consecutive = False, None, None, 0
        return False


losses = st.one_of(
    st.floats(0.05, 3.0), st.floats(13.0, 1e6), st.sampled_from([math.nan, math.inf, math.log(10)])
)


@settings(max_examples=60, deadline=None)
@given(sequence=st.lists(losses, min_size=1, max_size=40))
def test_the_panic_state_follows_the_original_rules_on_any_loss_sequence(sequence: list[float]) -> None:
    gov, oracle = TolariaGovernor(nn.Linear(2, 2), snapshot_backend="reference"), OriginalState()
    for loss in sequence:
        assert gov.check_vital_signs(loss) == oracle.check(loss)
        assert gov._panic_reason == oracle.reason and gov._pending_panic == oracle.pending
        assert gov.consecutive_panics == oracle.consecutive
        same_loss = gov._panic_loss == oracle.loss or (
            gov._panic_loss is not None and oracle.loss is not None and math.isnan(gov._panic_loss)
            and math.isnan(oracle.loss)
        )  # fmt: skip
        assert same_loss


# -- 4. pre-flight ------------------------------------------------------------------------------
def test_the_governor_answers_the_preflight_the_trainer_asks() -> None:
    gov = governor()
    request: dict[str, Any] = dict(
        operation=LifecycleOp.GERMINATE, slot_id="r0c1", blueprint_id=None, alpha_target=None,
        alpha_speed_steps=None, alpha_curve=None, val_loss=1.0, val_accuracy=0.5, seed_stage=None,
        total_params=100, effective_seed_params=0.0, max_seeds=0, active_seed_count=0,
        cooldown_epochs_remaining=0, event_id="evt-7",
    )  # fmt: skip
    verdict = gov.preflight_lifecycle_mutation(**request)
    assert isinstance(verdict, tolaria.LifecycleMutationVerdict)
    assert not verdict.approved and verdict.blocked_factor == "blueprint_present"
    assert "evt-7" in verdict.reason
    assert verdict.health_snapshot is not None and verdict.health_snapshot.operation == "GERMINATE"
    approved = gov.preflight_lifecycle_mutation(**{**request, "blueprint_id": "conv_light"})
    assert approved.approved and approved.reason == "approved" and approved.blocked_factor is None
    with pytest.raises(TypeError):
        gov.preflight_lifecycle_mutation(operation=LifecycleOp.WAIT)


# -- 5. attribution fields ------------------------------------------------------------------
def test_attribution_fields_travel_in_the_rollback_payload(events: list[TelemetryEvent]) -> None:
    gov = governor()
    gov.execute_rollback(
        env_id=2, triggering_action_id="morph-b0-e0-env2-r0c0-op1", raw_penalty=-10.0,
        normalized_penalty=-1.0, rollback_severity=10.0, watch_window_evidence=0.5, episode_idx=7,
    )  # fmt: skip
    (payload,) = rollbacks(events)
    assert (payload.env_id, payload.triggering_action_id, payload.episode_idx) == (
        2, "morph-b0-e0-env2-r0c0-op1", 7,
    )  # fmt: skip
    assert (payload.raw_penalty, payload.normalized_penalty, payload.rollback_severity) == (-10.0, -1.0, 10.0)
    assert payload.watch_window_evidence == 0.5
    again = TelemetryEvent.from_dict(events[-1].to_dict()).data
    assert again == payload  # the fields survive JSON


# -- 6. last_good_state: a plain dict whose edits are refused ---------------------------------
def _weights(gov: TolariaGovernor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gov.model.state_dict().items()}


def _sicken(gov: TolariaGovernor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in gov.model.parameters():
            p.add_(1.0)
    return _weights(gov)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["delete", "add", "in_place", "replace"])
def test_an_edited_lkg_is_refused_and_nothing_is_written(backend: str, edit: str) -> None:
    gov = governor(backend)
    lkg = gov.last_good_state
    assert type(lkg) is dict and lkg is gov.last_good_state
    if edit == "delete":
        del lkg["0.bias"]
        match = r"snapshot corruption or architecture drift.*\['0\.bias'\]"
    elif edit == "add":
        lkg["extra.weight"] = torch.zeros(1)
        match = r"snapshot corruption or architecture drift.*\['extra\.weight'\]"
    elif edit == "in_place":
        lkg["2.weight"].add_(1.0)
        match = r"\['2\.weight'\] were modified"
    else:
        lkg["0.weight"] = lkg["0.weight"].clone()
        match = r"\['0\.weight'\] were modified"
    before = _sicken(gov)
    with pytest.raises(RuntimeError, match=match):
        gov.execute_rollback()
    after = _weights(gov)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing half-written


def test_an_untouched_lkg_restores_and_seed_keys_may_come_and_go() -> None:
    gov = governor()
    lkg = gov.last_good_state
    assert lkg is not None
    expected = {k: v.clone() for k, v in lkg.items()}
    lkg["seed_slots.r0c0.seed.weight"] = torch.zeros(1)  # the seed namespace is not drift
    _sicken(gov)
    gov.execute_rollback()
    assert all(torch.equal(gov.model.state_dict()[k], v) for k, v in expected.items())


# -- 7. warnings on stderr, and the host's own hub --------------------------------------------
def test_a_rollback_whose_telemetry_fails_still_succeeds_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gov = governor()
    before = _weights(gov)
    _sicken(gov)

    def broken_hub() -> Any:
        raise ConnectionError("dashboard is down")

    monkeypatch.setattr(governor_module, "get_hub", broken_hub)
    report = gov.execute_rollback()
    assert report.rollback_occurred
    assert all(torch.equal(_weights(gov)[k], v) for k, v in before.items())
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["WARNING: Governor rollback succeeded but telemetry emission failed: dashboard is down"]


class _BrokenSlot:
    state = types.SimpleNamespace(stage=types.SimpleNamespace(name="TRAINING"))
    seed = nn.Linear(1, 1)
    alpha_schedule = None

    def prune(self, reason: str, *, initiator: str) -> None:
        raise RuntimeError("slot is locked")


class _Pruned(_BrokenSlot):
    def prune(self, reason: str, *, initiator: str) -> None:
        self.seed = None  # type: ignore[assignment]


class SeededModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.host = nn.Linear(3, 3)
        self.seed_slots = {"r0c0": _BrokenSlot(), "r0c1": _Pruned()}


def test_a_failing_seed_prune_is_reported_on_stderr_and_the_rollback_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    gov = TolariaGovernor(SeededModel(), snapshot_backend="reference")
    report = gov.execute_rollback()
    assert report.pruned_slots == ("r0c1",)
    err = capsys.readouterr().err
    assert "WARNING: Seed prune failed during rollback for slot r0c0: slot is locked" in err.splitlines()


@pytest.fixture
def host_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    module = types.ModuleType("host_app_telemetry")
    module.received = []  # type: ignore[attr-defined]
    module.on_event = module.received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "host_app_telemetry", module)
    yield module


def test_a_forwarding_sink_looks_its_target_up_at_every_event(
    host_app: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = telemetry.TelemetryHub([tolaria.ForwardingSink("host_app_telemetry:on_event")])
    monkeypatch.setattr(governor_module, "get_hub", lambda: hub)
    gov = governor()
    gov.execute_rollback()
    assert [e.event_type for e in host_app.received][-1] is TelemetryEventType.GOVERNOR_ROLLBACK
    patched: list[TelemetryEvent] = []
    monkeypatch.setattr(host_app, "on_event", patched.append)
    gov.execute_rollback()
    assert [e.event_type for e in patched] == [TelemetryEventType.GOVERNOR_ROLLBACK]
    with pytest.raises(ValueError, match="package.module:function"):
        tolaria.ForwardingSink("no_colon_here")


# -- 8/10. errors and the protocol ------------------------------------------------------------
def test_history_window_error_uses_the_original_words() -> None:
    words = r"history_window \(9\) must be >= MIN_GOVERNOR_HISTORY_SAMPLES \(10\)"
    with pytest.raises(ValueError, match=words):
        TolariaGovernor(nn.Linear(2, 2), history_window=9)


def test_the_governor_satisfies_the_protocol() -> None:
    assert isinstance(governor(), tolaria.GovernorProtocol)


# -- README: "Using tolaria inside esper-lite" runs as written --------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(title: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_swap_runs_and_forwards_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bridge, swap = _section_blocks("Using tolaria inside esper-lite")
    (tmp_path / "esper_bridge.py").write_text(bridge, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    hub = telemetry.TelemetryHub()
    monkeypatch.setattr(telemetry.hub, "_hub", hub)  # the snippet adds its sink to a private hub
    namespace: dict[str, Any] = {}
    exec(compile(swap, "README.md", "exec"), namespace)
    assert namespace["TolariaGovernor"] is tolaria.TolariaGovernor
    assert [type(s).__name__ for s in hub.sinks] == ["ForwardingSink"]
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    gov = namespace["TolariaGovernor"](net, optimizer=opt)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert gov.check_vital_signs(current_loss=math.nan)
    report = gov.execute_rollback(optimizer=opt, episode_idx=3)
    assert report.reason == "Structural Collapse" and report.panic_reason == "governor_nan"
    assert "tolaria governor_rollback: rolled back" in capsys.readouterr().out
    opt.state.clear()  # what esper's trainer does after a rollback: harmless
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
