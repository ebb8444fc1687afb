"""Typed telemetry: the event types, their frozen payload dataclasses, and the event itself.

An event is a :class:`TelemetryEvent` whose ``data`` is one of the payloads below. Nothing is
pickled: events serialise to JSON. Non-finite floats (a NaN loss is a normal thing to report)
are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` so that every line is
strict JSON; ``from_dict`` turns them back into floats.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import time
import typing
from collections.abc import Mapping
from typing import Any, TypeVar


class TelemetryEventType(str, enum.Enum):
    """What happened. Each type names who emits it."""

    #: A snapshot was resolved (committed or rejected); emitted by the Governor.
    GOVERNOR_SNAPSHOT = "governor_snapshot"
    #: The Governor decided the model is failing; emitted by ``check_vital_signs``/``check_health``.
    GOVERNOR_PANIC = "governor_panic"
    #: The model was rolled back to its Last Known Good; exactly one per rollback.
    GOVERNOR_ROLLBACK = "governor_rollback"
    #: Non-finite values were found where they must not be (a snapshot that was not committed).
    HEALTH_ALERT = "health_alert"
    #: A snapshot store keeps working in a slower or weaker mode (e.g. pinned memory unavailable).
    SNAPSHOT_DEGRADED = "snapshot_degraded"
    #: The recovery policy lowered the learning rate after a rollback; emitted by its ladder.
    RECOVERY_LR_BACKOFF = "recovery_lr_backoff"
    #: The recovery policy cleared the optimizer's moments after repeated rollbacks.
    RECOVERY_MOMENT_RESET = "recovery_moment_reset"
    #: The recovery budget ran out: TrainingAborted is raised (after saving the LKG).
    RECOVERY_ABORTED = "recovery_aborted"
    #: Shadow mode saw a panic and touched nothing (what it would have done is in the message).
    RECOVERY_OBSERVED = "recovery_observed"


class Severity(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


LOG_LEVELS = {
    Severity.DEBUG: logging.DEBUG,
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.ERROR: logging.ERROR,
    Severity.CRITICAL: logging.CRITICAL,
}

_P = TypeVar("_P", bound="_Payload")


_FIELD_KINDS: dict[type, dict[str, str]] = {}


def _field_kinds(cls: type) -> dict[str, str]:
    """Map each field of a payload class to 'float', 'tuple' or 'plain' (how from_dict coerces it)."""
    cached = _FIELD_KINDS.get(cls)
    if cached is not None:
        return cached
    kinds: dict[str, str] = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = set(typing.get_args(hint))
        if hint is float or args == {float, type(None)}:
            kinds[name] = "float"
        elif typing.get_origin(hint) is tuple:
            kinds[name] = "tuple"
        else:
            kinds[name] = "plain"
    _FIELD_KINDS[cls] = kinds
    return kinds


class _Payload:
    """Shared to_dict/from_dict for the frozen payload dataclasses (one implementation, not four)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (tuples become lists); floats are left as floats, NaN included."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[_P], data: Mapping[str, Any]) -> _P:
        """Rebuild a payload from :meth:`to_dict` output or a parsed JSON object.

        Raises:
            ValueError: a required field (one without a default) is missing; the message names it.
            TypeError: ``data`` is not a mapping.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{cls.__name__}.from_dict: missing required field(s) {missing}")
        kinds = _field_kinds(cls)
        kwargs: dict[str, Any] = {}
        # Unknown keys are ignored so that a newer writer's extra fields do not break an older reader.
        for f in fields:
            if f.name not in data:
                continue
            value = data[f.name]
            if kinds[f.name] == "float" and value is not None:
                value = float(value)  # accepts "NaN"/"Infinity" written by the JSONL sink
            elif kinds[f.name] == "tuple" and value is not None:
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class GovernorRollbackPayload(_Payload):
    """One rollback. ``consecutive_panics`` is the count at the panic, before the reset to 0;
    ``loss_at_panic`` is NaN when the rollback had no preceding panic. Key lists hold state-dict
    keys: ``missing_keys`` live in the model without a saved value, ``unexpected_keys`` were saved
    but have no live tensor (architecture drift when outside ``seed_slots.``). The last six
    fields are esper-lite's attribution of the rollback, passed to ``execute_rollback``;
    ``skipped_batches`` lists the batches seen between the LKG and the panic, when the loop
    passed their identities (a resumed run skips them)."""

    env_id: int
    device: str
    reason: str
    loss_at_panic: float
    loss_threshold: float
    consecutive_panics: int
    panic_reason: str | None = None
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    episode_idx: int | None = None
    triggering_action_id: str | None = None
    raw_penalty: float | None = None
    normalized_penalty: float | None = None
    rollback_severity: float | None = None
    watch_window_evidence: float | None = None
    skipped_batches: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class GovernorPanicPayload(_Payload):
    """A panic. ``loss`` and ``loss_threshold`` are NaN for health panics (weights/grads), where
    ``first_bad`` names the first sick tensor and ``grad_norm`` is the global gradient L2 norm."""

    reason: str
    device: str
    loss: float
    loss_threshold: float
    consecutive_panics: int
    first_bad: str | None = None
    grad_norm: float = math.nan


@dataclasses.dataclass(frozen=True)
class GovernorSnapshotPayload(_Payload):
    """A resolved snapshot. ``bytes`` counts tied tensors once; ``seconds`` is the host time the
    ``snapshot()`` call blocked; ``first_bad`` names the sick tensor when not committed."""

    device: str
    backend: str
    keys_captured: int
    keys_excluded: int
    bytes: int
    seconds: float
    committed: bool
    first_bad: str | None = None


@dataclasses.dataclass(frozen=True)
class HealthAlertPayload(_Payload):
    """Non-finite values found by ``source`` (e.g. ``"snapshot"``); ``bad_tensors`` lists the sick
    tensors in input order (at most a few dozen), ``nonfinite`` is the total count of bad elements."""

    source: str
    device: str
    first_bad: str | None
    nonfinite: int
    bad_tensors: tuple[str, ...] = ()
    backend: str = ""


@dataclasses.dataclass(frozen=True)
class SnapshotDegradedPayload(_Payload):
    """A snapshot store fell back to a weaker mode (``mode``) because of ``reason``."""

    backend: str
    mode: str
    reason: str


@dataclasses.dataclass(frozen=True)
class RecoveryPayload(_Payload):
    """One rung of the recovery ladder at ``step``: the panic ``reason``, how many rollbacks fell
    within the last ``window_steps`` steps, the learning-rate ``factor`` now in force (backoffs)
    and the ``path`` of the saved LKG (an abort with a ``save_dir``)."""

    step: int
    reason: str
    rollbacks_in_window: int
    window_steps: int
    factor: float | None = None
    path: str | None = None


TelemetryPayload = (
    GovernorRollbackPayload
    | GovernorPanicPayload
    | GovernorSnapshotPayload
    | HealthAlertPayload
    | SnapshotDegradedPayload
    | RecoveryPayload
)

PAYLOAD_TYPES: dict[TelemetryEventType, type[_Payload]] = {
    TelemetryEventType.GOVERNOR_ROLLBACK: GovernorRollbackPayload,
    TelemetryEventType.GOVERNOR_PANIC: GovernorPanicPayload,
    TelemetryEventType.GOVERNOR_SNAPSHOT: GovernorSnapshotPayload,
    TelemetryEventType.HEALTH_ALERT: HealthAlertPayload,
    TelemetryEventType.SNAPSHOT_DEGRADED: SnapshotDegradedPayload,
    TelemetryEventType.RECOVERY_LR_BACKOFF: RecoveryPayload,
    TelemetryEventType.RECOVERY_MOMENT_RESET: RecoveryPayload,
    TelemetryEventType.RECOVERY_ABORTED: RecoveryPayload,
    TelemetryEventType.RECOVERY_OBSERVED: RecoveryPayload,
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class TelemetryEvent:
    """One event. ``timestamp`` is seconds since the epoch (``time.time()``)."""

    event_type: TelemetryEventType
    severity: Severity
    message: str
    data: TelemetryPayload | Mapping[str, Any]
    timestamp: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        data = self.data.to_dict() if isinstance(self.data, _Payload) else dict(self.data)
        return {
            "event_type": self.event_type.value,
            "severity": self.severity.value,
            "message": self.message,
            "data": data,
            "timestamp": self.timestamp,
        }

    def to_json(self) -> str:
        """Strict JSON on one line (non-finite floats as strings, see the module docstring)."""
        return json.dumps(_json_safe(self.to_dict()), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TelemetryEvent:
        """Inverse of :meth:`to_dict`; ``data`` becomes the typed payload of the event type.

        Raises ValueError for an unknown event type/severity or a payload missing a required field.
        """
        event_type = TelemetryEventType(data["event_type"])
        payload = PAYLOAD_TYPES[event_type].from_dict(data["data"])
        return cls(
            event_type=event_type,
            severity=Severity(data["severity"]),
            message=str(data["message"]),
            data=payload,  # type: ignore[arg-type]
            timestamp=float(data["timestamp"]),
        )


__all__ = [
    "LOG_LEVELS",
    "PAYLOAD_TYPES",
    "GovernorPanicPayload",
    "GovernorRollbackPayload",
    "GovernorSnapshotPayload",
    "HealthAlertPayload",
    "RecoveryPayload",
    "Severity",
    "SnapshotDegradedPayload",
    "TelemetryEvent",
    "TelemetryEventType",
    "TelemetryPayload",
]
