"""Where telemetry goes: the process-wide :class:`TelemetryHub` and its sinks.

``get_hub()`` hands events to its sinks: Python logging (the default), a JSONL file, or a
callback. A sink that raises is reported through :mod:`logging` and never propagates into the
code that emitted the event: a broken dashboard must not break a rollback.
"""

from __future__ import annotations

import importlib
import logging
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tolaria.telemetry.payloads import (
    LOG_LEVELS,
    Severity,
    TelemetryEvent,
    TelemetryEventType,
    TelemetryPayload,
)

logger = logging.getLogger(__name__)


class TelemetrySink:
    """Receives events. Subclasses override :meth:`emit`; :meth:`close` releases resources."""

    def emit(self, event: TelemetryEvent) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class LoggingSink(TelemetrySink):
    """Writes each event to a :mod:`logging` logger at the level matching its severity."""

    def __init__(self, logger_name: str = "tolaria.events") -> None:
        self.logger = logging.getLogger(logger_name)

    def emit(self, event: TelemetryEvent) -> None:
        level = LOG_LEVELS[event.severity]
        if self.logger.isEnabledFor(level):
            self.logger.log(
                level, "%s: %s %s", event.event_type.value, event.message, event.to_dict()["data"]
            )


class JsonlSink(TelemetrySink):
    """Appends one JSON object per line to ``path`` and flushes after every event, so a crash
    loses at most the event being written. Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: typing.TextIO | None = self.path.open("a", encoding="utf-8")

    def emit(self, event: TelemetryEvent) -> None:
        line = event.to_json()
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"JsonlSink({str(self.path)!r}) is closed")
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class CallbackSink(TelemetrySink):
    """Calls ``callback(event)`` for every event."""

    def __init__(self, callback: Callable[[TelemetryEvent], object]) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.callback = callback

    def emit(self, event: TelemetryEvent) -> None:
        self.callback(event)


class ForwardingSink(TelemetrySink):
    """Hands every typed event to a function of the host application, named by its import path
    (``"package.module:function"``; attributes may be dotted: ``"app.telemetry:hub.emit"``).

    The path is resolved at every event, not once, so replacing that attribute (a test's
    ``monkeypatch.setattr``, or the host swapping its hub) takes effect at once. Use it to send
    tolaria's events into an application's own telemetry (esper-lite's hub, a dashboard)::

        tolaria.get_hub().add_sink(tolaria.ForwardingSink("myapp.telemetry:on_tolaria_event"))

    Raises ValueError for a path without ``module:attribute``; a path that no longer resolves
    raises at emit time, which the hub logs (the rollback is not affected).
    """

    def __init__(self, target: str) -> None:
        module, sep, attribute = target.partition(":") if isinstance(target, str) else ("", "", "")
        if not sep or not module or not attribute:
            raise ValueError(f"target must be 'package.module:function', got {target!r}")
        self.target = target
        self._module, self._attribute = module, attribute

    def resolve(self) -> Callable[[TelemetryEvent], object]:
        """The function the path names now."""
        value: Any = importlib.import_module(self._module)
        for part in self._attribute.split("."):
            value = getattr(value, part)
        if not callable(value):
            raise TypeError(f"ForwardingSink target {self.target!r} is not callable")
        return value  # type: ignore[no-any-return]

    def emit(self, event: TelemetryEvent) -> None:
        self.resolve()(event)


class TelemetryHub:
    """Fans events out to sinks. ``emit`` never raises because of a sink: failures are logged."""

    def __init__(self, sinks: typing.Iterable[TelemetrySink] | None = None) -> None:
        self._lock = threading.Lock()
        self._sinks: list[TelemetrySink] = list(sinks) if sinks is not None else []

    @property
    def sinks(self) -> tuple[TelemetrySink, ...]:
        return tuple(self._sinks)

    def add_sink(self, sink: TelemetrySink | Callable[[TelemetryEvent], object]) -> TelemetrySink:
        """Register ``sink`` (a :class:`TelemetrySink` or a plain callable); returns the sink object
        to pass to :meth:`remove_sink`."""
        wrapped = sink if isinstance(sink, TelemetrySink) else CallbackSink(sink)
        with self._lock:
            self._sinks.append(wrapped)
        return wrapped

    def remove_sink(self, sink: TelemetrySink) -> None:
        with self._lock:
            self._sinks = [s for s in self._sinks if s is not sink]

    def clear_sinks(self) -> None:
        with self._lock:
            self._sinks = []

    def emit(self, event: TelemetryEvent) -> None:
        # Copy under the lock, call outside it: a slow sink must not block add/remove elsewhere.
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink.emit(event)
            except Exception:
                logger.exception(
                    "telemetry sink %r failed on %s; event dropped for it", sink, event.event_type.value
                )


_hub: TelemetryHub | None = None
_hub_lock = threading.Lock()


def get_hub() -> TelemetryHub:
    """The process-wide hub, created on first use with a :class:`LoggingSink`."""
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = TelemetryHub([LoggingSink()])
        return _hub


def set_hub(hub: TelemetryHub | None) -> TelemetryHub | None:
    """Replace the process-wide hub (None: a fresh default one on next use); returns the old one."""
    global _hub
    if hub is not None and not isinstance(hub, TelemetryHub):
        raise TypeError(f"hub must be a TelemetryHub or None, got {type(hub).__name__}")
    with _hub_lock:
        old, _hub = _hub, hub
    return old


def emit_event(
    event_type: TelemetryEventType,
    severity: Severity,
    message: str,
    data: TelemetryPayload,
    hub: TelemetryHub | None = None,
) -> TelemetryEvent:
    """Build an event and send it to ``hub`` (default: ``get_hub()``); returns the event."""
    event = TelemetryEvent(event_type, severity, message, data)
    (hub if hub is not None else get_hub()).emit(event)
    return event


__all__ = [
    "CallbackSink",
    "ForwardingSink",
    "JsonlSink",
    "LoggingSink",
    "TelemetryHub",
    "TelemetrySink",
    "emit_event",
    "get_hub",
    "set_hub",
]
