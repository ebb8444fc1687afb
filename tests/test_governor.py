"""TolariaGovernor: drop-in API, snapshots that are never sick, rollbacks that are bit-exact."""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque

import pytest
import torch
from torch import nn

import tolaria.governor as governor_module
from tolaria import RecoveryPolicy, TrainingAborted, telemetry
from tolaria.constants import DEFAULT_GOVERNOR_HISTORY_WINDOW
from tolaria.governor import GovernorReport, SnapshotInfo, TolariaGovernor
from tolaria.snapshot import reference
from tolaria.telemetry import TelemetryEvent, TelemetryEventType, TelemetryHub


def of_type(events: list[TelemetryEvent], event_type: TelemetryEventType) -> list[TelemetryEvent]:
    return [e for e in events if e.event_type is event_type]


def small_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()
    return t.clone()


def state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: bits(v) for k, v in model.state_dict().items()}


def same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    now = state_bits(model)
    return now.keys() == expected.keys() and all(torch.equal(now[k], v) for k, v in expected.items())


def corrupt(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(1)
        model[0].weight[0, 0] = math.nan  # type: ignore[index]
        model[1].num_batches_tracked += 5  # type: ignore[index,operator]


def gov_for(model: nn.Module, **kwargs: object) -> TolariaGovernor:
    return TolariaGovernor(model, snapshot_backend="reference", **kwargs)  # type: ignore[arg-type]


# -- drop-in API -----------------------------------------------------------------------------
def test_signature_defaults_and_attributes_match_the_original() -> None:
    params = inspect.signature(TolariaGovernor).parameters
    positional = [
        ("model", inspect.Parameter.empty),
        ("sensitivity", 6.0),
        ("multiplier", 3.0),
        ("absolute_threshold", 12.0),
        ("death_penalty", 10.0),
        ("history_window", 20),
        ("min_panics_before_rollback", 3),
        ("random_guess_loss", None),
    ]
    assert [(n, params[n].default) for n, _ in positional] == positional
    keyword_only = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == [
        "optimizer",
        "check_parameters",
        "check_gradients",
        "snapshot_backend",
        "health_backend",
        "process_group",
        "recovery",
    ]
    model = small_model()
    gov = TolariaGovernor(model, 5.0, 2.0, 11.0, 7.0, 15, 2)
    assert gov.model is model
    assert (gov.sensitivity, gov.multiplier, gov.absolute_threshold, gov.death_penalty) == (
        5.0,
        2.0,
        11.0,
        7.0,
    )
    assert isinstance(gov.loss_history, deque) and gov.loss_history.maxlen == 15
    assert gov.min_panics_before_rollback == 2 and gov.consecutive_panics == 0
    assert gov.random_guess_loss == pytest.approx(math.log(10))
    assert gov.get_punishment_reward() == -7.0
    assert isinstance(gov.last_good_state, dict)
    assert list(GovernorReport.__dataclass_fields__)[:5] == [
        "reason",
        "loss_at_panic",
        "loss_threshold",
        "consecutive_panics",
        "rollback_occurred",
    ]
    assert TolariaGovernor(small_model()).loss_history.maxlen == DEFAULT_GOVERNOR_HISTORY_WINDOW


def test_attribute_assignment_keeps_working_and_is_validated() -> None:
    gov = gov_for(small_model())
    gov.sensitivity = 2.0
    gov.min_panics_before_rollback = 1
    gov.absolute_threshold = 0.0
    for _ in range(10):
        gov.check_vital_signs(1.0)
    assert gov.check_vital_signs(3.5)  # 1 anomaly suffices now, 3.5 > 3 x 1.0
    with pytest.raises(ValueError, match="min_panics_before_rollback"):
        gov.min_panics_before_rollback = 0
    with pytest.raises(TypeError, match="sensitivity"):
        gov.sensitivity = "x"  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"history_window": 9},
            ValueError,
            r"history_window \(9\) must be >= MIN_GOVERNOR_HISTORY_SAMPLES \(10\)",
        ),
        ({"snapshot_backend": "gpu"}, ValueError, "snapshot_backend must be one of"),
        (
            {"health_backend": "cuda"},
            ValueError,
            r"health_backend must be one of \('auto', 'triton', 'native', 'reference'\)",
        ),
        ({"check_gradients": 1}, TypeError, "check_gradients"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        ({"death_penalty": math.nan}, ValueError, "death_penalty"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TolariaGovernor(small_model(), **kwargs)


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        TolariaGovernor({"w": torch.ones(1)})  # type: ignore[arg-type]


def test_check_vital_signs_rejects_non_numbers_naming_the_type() -> None:
    gov = gov_for(small_model())
    with pytest.raises(TypeError, match="list"):
        gov.check_vital_signs([1.0])
    with pytest.raises(TypeError, match=r"shape \(3,\)"):
        gov.check_vital_signs(torch.ones(3))


# -- snapshot --------------------------------------------------------------------------------
def test_snapshot_info_and_last_good_state(events: list[TelemetryEvent]) -> None:
    model = small_model()
    gov = gov_for(model)
    info = gov.snapshot()
    assert isinstance(info, SnapshotInfo) and info.committed is True and info.backend == "reference"
    assert info.keys_captured == tuple(model.state_dict()) and info.keys_excluded == ()
    assert info.bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert info.seconds >= 0.0 and info.first_bad is None
    lkg = gov.last_good_state
    assert lkg is gov.last_good_state and set(lkg) == set(model.state_dict())  # type: ignore[arg-type]
    assert all(t.device.type == "cpu" and not t.requires_grad for t in lkg.values())  # type: ignore[union-attr]
    gov.snapshot()
    assert gov.last_good_state is not lkg  # a new dict per commit
    snapshots = of_type(events, TelemetryEventType.GOVERNOR_SNAPSHOT)
    assert len(snapshots) == 3 and all(e.data.committed for e in snapshots)  # type: ignore[union-attr]


def test_a_sick_snapshot_keeps_the_previous_lkg_and_alerts(events: list[TelemetryEvent]) -> None:
    model = small_model()
    gov = gov_for(model)
    lkg = gov.last_good_state
    good = state_bits(model)
    corrupt(model)
    info = gov.snapshot()
    assert info.committed is False and info.first_bad == "0.weight"
    assert gov.last_good_state is lkg
    alerts = of_type(events, TelemetryEventType.HEALTH_ALERT)
    assert len(alerts) == 1 and alerts[0].data.first_bad == "0.weight"  # type: ignore[union-attr]
    assert alerts[0].data.nonfinite == 1  # type: ignore[union-attr]
    gov.execute_rollback()
    assert same_state(model, good)


def test_snapshot_inside_a_non_default_cuda_stream_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    gov = gov_for(small_model())
    default, side = object(), object()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: default)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: side)
    with pytest.raises(RuntimeError, match="non-default CUDA stream"):
        gov.snapshot()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: default)
    assert gov.snapshot().committed


# -- rollback --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rollback_is_bit_exact_and_keeps_parameter_identity(dtype: torch.dtype) -> None:
    model = small_model(dtype)
    model[1].num_batches_tracked.fill_(17)  # type: ignore[index,operator]
    gov = gov_for(model)
    good = state_bits(model)
    params = list(model.parameters())
    corrupt(model)
    report = gov.execute_rollback()
    assert report.rollback_occurred and report.reason == "Structural Collapse" and report.panic_reason is None
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert same_state(model, good)
    assert model[1].num_batches_tracked.dtype == torch.int64  # type: ignore[index]


def test_exactly_one_rollback_event_carrying_the_panic(events: list[TelemetryEvent]) -> None:
    model = small_model()
    gov = gov_for(model, min_panics_before_rollback=2)
    for _ in range(10):
        assert not gov.check_vital_signs(1.0)
    assert not gov.check_vital_signs(100.0)
    assert gov.check_vital_signs(120.0)
    panics = of_type(events, TelemetryEventType.GOVERNOR_PANIC)
    assert len(panics) == 1 and panics[0].data.reason == "governor_divergence"  # type: ignore[union-attr]
    report = gov.execute_rollback(env_id=4)
    rollbacks = of_type(events, TelemetryEventType.GOVERNOR_ROLLBACK)
    assert len(rollbacks) == 1
    payload = rollbacks[0].data
    assert isinstance(payload, telemetry.GovernorRollbackPayload)
    assert (payload.env_id, payload.reason, payload.panic_reason) == (
        4,
        "governor_divergence",
        "governor_divergence",
    )
    assert payload.consecutive_panics == 2 and payload.loss_at_panic == 120.0 and payload.device == "cpu"
    assert payload.loss_threshold == pytest.approx(1.0)
    assert payload.missing_keys == () and payload.unexpected_keys == ()
    assert report.consecutive_panics == 0 and gov.consecutive_panics == 0  # post-rollback count
    assert (report.panic_reason, report.loss_at_panic, report.env_id) == ("governor_divergence", 120.0, 4)
    again = gov.execute_rollback()
    assert len(of_type(events, TelemetryEventType.GOVERNOR_ROLLBACK)) == 2
    assert again.panic_reason is None and math.isnan(again.loss_at_panic)


def test_nan_loss_panics_at_once_and_the_report_carries_it() -> None:
    gov = gov_for(small_model())
    assert gov.check_vital_signs(torch.tensor(float("nan")))
    report = gov.execute_rollback()
    assert report.panic_reason == "governor_nan" and math.isnan(report.loss_at_panic)
    assert len(gov.loss_history) == 0


def test_a_raising_sink_never_breaks_a_rollback(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(telemetry.TelemetrySink):
        def emit(self, event: TelemetryEvent) -> None:
            raise RuntimeError("sink exploded")

    old = telemetry.set_hub(TelemetryHub([Broken()]))
    try:
        model = small_model()
        gov = gov_for(model)
        good = state_bits(model)
        corrupt(model)
        with caplog.at_level(logging.ERROR, logger="tolaria.telemetry"):
            assert gov.check_vital_signs(math.inf)
            report = gov.execute_rollback()
    finally:
        telemetry.set_hub(old)
    assert report.rollback_occurred and same_state(model, good)
    assert sum("sink" in r.getMessage() for r in caplog.records) >= 2


def test_the_hub_is_looked_up_through_tolaria_governor_get_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TelemetryEvent] = []
    hub = TelemetryHub([telemetry.CallbackSink(seen.append)])
    gov = gov_for(small_model())
    monkeypatch.setattr(governor_module, "get_hub", lambda: hub)
    gov.execute_rollback()
    assert [e.event_type for e in seen] == [TelemetryEventType.GOVERNOR_ROLLBACK]


def test_architecture_drift_raises_and_leaves_the_lkg_for_another_try(events: list[TelemetryEvent]) -> None:
    model = small_model()
    gov = gov_for(model)
    good = state_bits(model)
    corrupt(model)
    model.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"architecture drift.*missing \['extra.weight', 'extra.bias'\]"):
        gov.execute_rollback()
    rollbacks = of_type(events, TelemetryEventType.GOVERNOR_ROLLBACK)
    assert len(rollbacks) == 1 and rollbacks[0].data.missing_keys == ("extra.weight", "extra.bias")  # type: ignore[union-attr]
    del model.extra
    model[0].weight.data.fill_(5.0)  # type: ignore[index]
    report = gov.execute_rollback()
    assert report.rollback_occurred and same_state(model, good)
    # A removed host layer is drift too (saved values with nowhere to go).
    model[3] = nn.Identity()  # type: ignore[index]
    with pytest.raises(RuntimeError, match=r"unexpected \['3.weight', '3.bias'\]"):
        gov.execute_rollback()


def test_a_shape_change_raises_before_anything_is_written() -> None:
    model = small_model()
    gov = gov_for(model)
    model[3] = nn.Linear(8, 5)  # type: ignore[index]
    before = state_bits(model)
    with pytest.raises(RuntimeError, match="3.weight"):
        gov.execute_rollback()
    assert same_state(model, before)
    assert gov.last_good_state is not None


def test_rollback_without_any_committed_snapshot_raises() -> None:
    model = small_model()
    corrupt(model)
    gov = gov_for(model)  # the constructor's snapshot is sick: nothing committed
    assert gov.last_good_state is None
    with pytest.raises(RuntimeError, match="no Last Known Good"):
        gov.execute_rollback()


def test_reset_clears_the_monitors_and_snapshots_again() -> None:
    model = small_model()
    gov = gov_for(model)
    for _ in range(12):
        gov.check_vital_signs(1.0)
    assert gov.check_vital_signs(math.nan)
    with torch.no_grad():
        model[0].bias.fill_(0.25)  # type: ignore[index]
    gov.reset()
    assert len(gov.loss_history) == 0 and gov.consecutive_panics == 0
    assert torch.equal(gov.last_good_state["0.bias"], torch.full((8,), 0.25))  # type: ignore[index]
    assert gov.execute_rollback().panic_reason is None


def no_pinned_memory(numel: int, dtype: torch.dtype) -> torch.Tensor:
    raise RuntimeError("pinned memory pool exhausted")


def test_every_event_type_is_emitted_by_something(
    events: list[TelemetryEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gov = gov_for(model, optimizer=opt)
    assert gov.check_vital_signs(math.nan)
    gov.execute_rollback()
    corrupt(model)
    gov.snapshot()
    assert gov.check_health()
    # A store that cannot pin its buffers reports that it degraded to pageable memory.
    monkeypatch.setattr(reference, "_pinned_empty", no_pinned_memory)
    store = reference.ReferenceSnapshotStore(pin_memory=True)
    store.capture({"w": torch.ones(1)})
    store.resolve()
    # The recovery policy's rungs: backoff and moment reset, then the budget; shadow mode.
    policy = RecoveryPolicy(max_rollbacks=1, reset_moments_after=1)
    other = small_model()
    recovering = gov_for(other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), recovery=policy)
    recovering.execute_rollback()
    with pytest.raises(TrainingAborted):
        recovering.execute_rollback()
    gov_for(small_model(), recovery=RecoveryPolicy(mode="observe")).execute_rollback()
    assert {e.event_type for e in events} == set(TelemetryEventType)


def test_auto_backend_rolls_back_bit_exact() -> None:
    model = small_model()
    gov = TolariaGovernor(model)
    assert gov.snapshot_backend in ("native", "reference")
    good = state_bits(model)
    corrupt(model)
    gov.execute_rollback()
    assert same_state(model, good)


def test_a_patched_governor_hub_also_receives_the_stores_degraded_event(
    events: list[TelemetryEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tolaria import governor as governor_module
    from tolaria.telemetry import CallbackSink, TelemetryHub

    mine: list[TelemetryEvent] = []
    monkeypatch.setattr(governor_module, "get_hub", lambda: TelemetryHub([CallbackSink(mine.append)]))
    monkeypatch.setattr(reference, "_pinned_empty", no_pinned_memory)
    gov = gov_for(small_model())
    gov._store.pin_memory = True  # a CPU model never pins; force the path that can fail
    gov.snapshot()
    degraded = [e for e in mine if e.event_type == TelemetryEventType.SNAPSHOT_DEGRADED]
    assert len(degraded) == 1 and degraded[0].data.backend == "reference"
    assert TelemetryEventType.SNAPSHOT_DEGRADED not in {e.event_type for e in events}  # not the global hub
