"""Typed telemetry: what the watchdog saw and did, as events a person or a program can read.

:mod:`~tolaria.telemetry.payloads` holds the event types and their payloads,
:mod:`~tolaria.telemetry.hub` the hub and its sinks, :mod:`~tolaria.telemetry.events` the
builders of the Governor's own events. This package face only hands their names on.
"""

from tolaria.telemetry.hub import (
    CallbackSink,
    ForwardingSink,
    JsonlSink,
    LoggingSink,
    TelemetryHub,
    TelemetrySink,
    emit_event,
    get_hub,
    set_hub,
)
from tolaria.telemetry.payloads import (
    PAYLOAD_TYPES,
    GovernorPanicPayload,
    GovernorRollbackPayload,
    GovernorSnapshotPayload,
    HealthAlertPayload,
    Severity,
    SnapshotDegradedPayload,
    TelemetryEvent,
    TelemetryEventType,
    TelemetryPayload,
)

__all__ = [
    "PAYLOAD_TYPES",
    "CallbackSink",
    "ForwardingSink",
    "GovernorPanicPayload",
    "GovernorRollbackPayload",
    "GovernorSnapshotPayload",
    "HealthAlertPayload",
    "JsonlSink",
    "LoggingSink",
    "Severity",
    "SnapshotDegradedPayload",
    "TelemetryEvent",
    "TelemetryEventType",
    "TelemetryHub",
    "TelemetryPayload",
    "TelemetrySink",
    "emit_event",
    "get_hub",
    "set_hub",
]
