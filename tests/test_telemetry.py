"""Typed telemetry: payload round-trips, strict JSON lines, and sinks that fail without harm."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tolaria import telemetry
from tolaria.telemetry import (
    PAYLOAD_TYPES,
    CallbackSink,
    GovernorPanicPayload,
    GovernorRollbackPayload,
    GovernorSnapshotPayload,
    HealthAlertPayload,
    JsonlSink,
    LoggingSink,
    Severity,
    SnapshotDegradedPayload,
    TelemetryEvent,
    TelemetryEventType,
    TelemetryHub,
    TelemetrySink,
)

SAMPLES = [
    GovernorRollbackPayload(0, "cpu", "governor_nan", math.nan, 3.5, 2, "governor_nan", ("a.w",), ("b",)),
    GovernorPanicPayload("governor_nonfinite_grads", "cpu", math.nan, math.inf, 1, "fc.weight.grad", 12.5),
    GovernorSnapshotPayload("cpu", "reference", 4, 1, 1024, 0.001, False, "fc.bias"),
    HealthAlertPayload("snapshot", "cpu", "fc.bias", 3, ("fc.bias",), "reference"),
    SnapshotDegradedPayload("reference", "pageable", "no accelerator"),
]


def same(a: object, b: object) -> bool:
    """Dataclass equality where NaN equals NaN."""
    for f in dataclasses.fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return type(a) is type(b)


def reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: type(p).__name__)
def test_payload_round_trips_through_dict_and_json(payload: object) -> None:
    assert same(type(payload).from_dict(payload.to_dict()), payload)  # type: ignore[attr-defined]
    event_type = next(t for t, cls in PAYLOAD_TYPES.items() if cls is type(payload))
    event = TelemetryEvent(event_type, Severity.WARNING, "msg", payload, timestamp=12.5)  # type: ignore[arg-type]
    parsed = json.loads(event.to_json(), parse_constant=reject_constant)  # strict JSON: no NaN literal
    back = TelemetryEvent.from_dict(parsed)
    assert back.event_type is event_type and back.severity is Severity.WARNING and back.timestamp == 12.5
    assert same(back.data, payload)


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: type(p).__name__)
def test_from_dict_names_a_missing_required_field(payload: object) -> None:
    data = payload.to_dict()  # type: ignore[attr-defined]
    first = dataclasses.fields(payload)[0].name  # type: ignore[arg-type]
    del data[first]
    with pytest.raises(ValueError, match=first):
        type(payload).from_dict(data)  # type: ignore[attr-defined]


def test_from_dict_rejects_non_mappings_and_ignores_unknown_fields() -> None:
    with pytest.raises(TypeError, match="mapping"):
        SnapshotDegradedPayload.from_dict(["backend"])  # type: ignore[arg-type]
    data = {**SAMPLES[-1].to_dict(), "added_by_a_newer_writer": 1}
    assert SnapshotDegradedPayload.from_dict(data) == SAMPLES[-1]


@settings(max_examples=60, deadline=None)
@given(
    loss=st.floats(allow_nan=True, allow_infinity=True),
    threshold=st.floats(allow_nan=True, allow_infinity=True),
    panics=st.integers(0, 10**6),
    keys=st.lists(st.text(max_size=12), max_size=5),
)
def test_rollback_payload_round_trips_any_values(
    loss: float, threshold: float, panics: int, keys: list[str]
) -> None:
    payload = GovernorRollbackPayload(3, "cuda:0", "r", loss, threshold, panics, None, tuple(keys), ())
    event = TelemetryEvent(TelemetryEventType.GOVERNOR_ROLLBACK, Severity.INFO, "m", payload)
    parsed = json.loads(event.to_json(), parse_constant=reject_constant)
    assert same(TelemetryEvent.from_dict(parsed).data, payload)


def test_every_event_type_has_a_payload_class() -> None:
    assert set(PAYLOAD_TYPES) == set(TelemetryEventType)


def test_jsonl_sink_writes_one_flushed_json_object_per_line(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    hub = TelemetryHub([sink])
    for payload in SAMPLES[:3]:
        event_type = next(t for t, cls in PAYLOAD_TYPES.items() if cls is type(payload))
        hub.emit(TelemetryEvent(event_type, Severity.INFO, "m", payload))  # type: ignore[arg-type]
        # Flushed per event: readable before the sink is closed.
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    parsed = [json.loads(line, parse_constant=reject_constant) for line in lines]
    assert [p["event_type"] for p in parsed] == ["governor_rollback", "governor_panic", "governor_snapshot"]
    assert parsed[0]["data"]["loss_at_panic"] == "NaN"
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sink.emit(TelemetryEvent(TelemetryEventType.HEALTH_ALERT, Severity.INFO, "m", SAMPLES[3]))


def test_a_raising_sink_is_logged_and_the_others_still_receive(caplog) -> None:
    received: list[TelemetryEvent] = []

    class Broken(TelemetrySink):
        def emit(self, event: TelemetryEvent) -> None:
            raise OSError("disk full")

    hub = TelemetryHub([Broken()])
    hub.add_sink(received.append)  # a plain callable is wrapped in a CallbackSink
    event = TelemetryEvent(TelemetryEventType.HEALTH_ALERT, Severity.ERROR, "m", SAMPLES[3])
    with caplog.at_level(logging.ERROR, logger="tolaria.telemetry"):
        hub.emit(event)
    assert received == [event]
    assert any("disk full" in (r.exc_text or "") or "failed" in r.getMessage() for r in caplog.records)


def test_hub_add_remove_and_clear_sinks() -> None:
    hub = TelemetryHub()
    seen: list[TelemetryEvent] = []
    sink = hub.add_sink(CallbackSink(seen.append))
    assert hub.sinks == (sink,)
    hub.remove_sink(sink)
    hub.emit(TelemetryEvent(TelemetryEventType.HEALTH_ALERT, Severity.INFO, "m", SAMPLES[3]))
    assert seen == []
    hub.add_sink(sink)
    hub.clear_sinks()
    assert hub.sinks == ()
    with pytest.raises(TypeError, match="callable"):
        CallbackSink(42)  # type: ignore[arg-type]


def test_logging_sink_uses_the_severity_as_level(caplog) -> None:
    sink = LoggingSink("tolaria.events.test")
    with caplog.at_level(logging.DEBUG, logger="tolaria.events.test"):
        sink.emit(TelemetryEvent(TelemetryEventType.GOVERNOR_PANIC, Severity.CRITICAL, "boom", SAMPLES[1]))
    record = caplog.records[-1]
    assert record.levelno == logging.CRITICAL and "governor_panic" in record.getMessage()


def test_get_hub_is_process_wide_with_a_logging_sink_and_replaceable() -> None:
    old = telemetry.set_hub(None)
    try:
        hub = telemetry.get_hub()
        assert telemetry.get_hub() is hub
        assert any(isinstance(s, LoggingSink) for s in hub.sinks)
        mine = TelemetryHub()
        telemetry.set_hub(mine)
        assert telemetry.get_hub() is mine
        with pytest.raises(TypeError, match="TelemetryHub"):
            telemetry.set_hub(object())  # type: ignore[arg-type]
    finally:
        telemetry.set_hub(old)
