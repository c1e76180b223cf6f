"""Logs: the memory store, its three sources, and the ``log`` trigger type.

The store keeps each log as its JSON (so what it holds is what it counts),
within ``logs_max_count`` entries and ``logs_max_bytes`` bytes, the oldest
evicted first; one entry is at most ``logs_max_entry_bytes``: a longer one is
cut (:func:`~.bounds.fit_record`: the body keeps its head, with a note saying
how much was left out, and the attribute ``iii.truncated`` says why).  A log
is cut rather than refused because it is diagnostic: its beginning is what a
reader needs, and an SDK's ``LOGS`` frame has nobody to tell about a refusal.

Sources, all stored as upstream's log JSON (spec modules.md §8):

* ``engine::log::{info,warn,error,debug,trace}`` calls (their trace and span
  ids default to the invocation's span, so a worker's log line sits in its
  trace);
* the engine's own Python log records at or above ``level``, through
  :class:`EngineLogHandler` on the ``iii`` logger, with the trace and span of
  the span open in the emitting task (:data:`~.tracer.CURRENT_SPAN`); their
  body is bounded like the text log's (:func:`iii.log.record_message`) but
  not escaped: in a JSON store a newline is data, not the end of a record.
  The handler only *enqueues* (:mod:`.log_intake`, from any thread); the
  module stores what it queued from its own task;
* SDK ``LOGS`` frames (OTLP/JSON ``resourceLogs``).

Every stored log is offered to the ``log`` triggers whose ``level`` is
``all`` or equals the log's lowercased severity text (the module does it,
bounding chains with the causation depth: see its docstring).

The store is used from the trio thread only (the handler's records reach it
through the intake), so it has no lock.

Lifetime: owned by the observability module; the handler is attached while
the module runs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import orjson

from iii.causation import current_depth
from iii.errors import TriggerRegistrationError
from iii.log import MAX_MESSAGE_CHARS, bounded_repr, record_message, truncate
from iii.modules.observability.bounds import BoundedRing, fit_record
from iii.modules.observability.log_intake import LogIntake
from iii.modules.observability.spans import (
    otlp_attributes,
    otlp_int,
    otlp_value,
    parse_otlp_id,
)
from iii.modules.observability.tracer import CURRENT_SPAN
from iii.registry import LogicalTrigger

__all__ = [
    "LogStore",
    "StoredLog",
    "EngineLogHandler",
    "LogTriggers",
    "SEVERITY",
    "attached_handler",
    "STORED_MARK",
]

# Upstream's severity numbers per level.
SEVERITY = {"trace": 1, "debug": 5, "info": 9, "warn": 13, "error": 17}
_PY_LEVELS = {
    "trace": 5,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
TRIGGER_LEVELS = ("all", "trace", "debug", "info", "warn", "error")

# ``extra`` key of records the module wrote itself (already stored).
STORED_MARK = "iii_log_stored"


def severity_of(levelno: int) -> tuple[int, str]:
    if levelno >= logging.ERROR:
        return SEVERITY["error"], "ERROR"
    if levelno >= logging.WARNING:
        return SEVERITY["warn"], "WARN"
    if levelno >= logging.INFO:
        return SEVERITY["info"], "INFO"
    if levelno >= logging.DEBUG:
        return SEVERITY["debug"], "DEBUG"
    return SEVERITY["trace"], "TRACE"


# Bytes counted for a stored log on top of its JSON and its index strings (the
# record object, the bytes object's header, the ring's slot).
ENTRY_OVERHEAD = 256


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@attrs.frozen(slots=True)
class StoredLog:
    """One stored log: its JSON, and the fields queries filter on."""

    timestamp_ns: int
    severity_number: int
    severity_text: str  # lowercased
    trace_id: str | None
    span_id: str | None
    encoded: bytes
    # The entry's JSON size as it came, and whether it was cut to fit.
    original_bytes: int
    truncated: bool

    @property
    def size(self) -> int:
        """The bytes this log is counted for in the store's byte bound."""
        return (
            len(self.encoded)
            + len(self.severity_text)
            + len(self.trace_id or "")
            + len(self.span_id or "")
            + ENTRY_OVERHEAD
        )

    def entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = orjson.loads(self.encoded)
        return entry


LogListener = Callable[[dict[str, Any], StoredLog], None]


class LogStore:
    """The stored logs, oldest evicted first (see the module docstring);
    each listener sees each new log, as a dict and as stored."""

    def __init__(
        self,
        max_count: int,
        sampling_ratio: float = 1.0,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        max_entry_bytes: int = 64 * 1024,
    ):
        self.sampling_ratio = sampling_ratio
        self.max_entry_bytes = max_entry_bytes
        self.listeners: list[LogListener] = []
        self._ring = BoundedRing[StoredLog](max_count, max_bytes)

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def bytes(self) -> int:
        """The bytes the stored logs are counted for (at most ``max_bytes``)."""
        return self._ring.bytes

    def add(self, entry: dict[str, Any]) -> StoredLog | None:
        """Store a log (cut to ``max_entry_bytes`` if needed); None if it was sampled out."""
        if self.sampling_ratio < 1 and random.random() >= self.sampling_ratio:
            return None
        fitted = fit_record(entry, self.max_entry_bytes, main="body", secondary=("resource",))
        record = fitted.record
        stored = StoredLog(
            timestamp_ns=_int(record.get("timestamp_unix_nano")),
            severity_number=_int(record.get("severity_number")),
            severity_text=str(record.get("severity_text", "")).lower(),
            trace_id=_id(record.get("trace_id")),
            span_id=_id(record.get("span_id")),
            encoded=fitted.encoded,
            original_bytes=fitted.original_bytes,
            truncated=fitted.truncated,
        )
        self._ring.add(stored, stored.size)
        for listener in self.listeners:
            listener(record, stored)
        return stored

    def entries(self) -> list[dict[str, Any]]:
        """Every stored log, oldest first."""
        return [log.entry() for log in self._ring]

    def clear(self) -> None:
        self._ring.clear()

    def query(
        self,
        *,
        start_ms: int | None = None,
        end_ms: int | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
        severity_min: int | None = None,
        severity_text: str | None = None,
    ) -> list[StoredLog]:
        """The stored logs that match, oldest first (``StoredLog.entry()`` decodes one)."""
        out = []
        for log in self._ring:
            stamp_ms = log.timestamp_ns // 1_000_000
            if start_ms is not None and stamp_ms < start_ms:
                continue
            if end_ms is not None and stamp_ms > end_ms:
                continue
            if trace_id is not None and log.trace_id != trace_id.lower():
                continue
            if span_id is not None and log.span_id != span_id.lower():
                continue
            if severity_min is not None and log.severity_number < severity_min:
                continue
            if severity_text is not None and log.severity_text != severity_text.lower():
                continue
            out.append(log)
        return out


def make_entry(
    *,
    body: Any,
    severity_number: int,
    severity_text: str,
    resource: dict[str, Any],
    attributes: dict[str, Any] | None = None,
    trace_id: str | None = None,
    span_id: str | None = None,
    timestamp_ns: int | None = None,
    observed_ns: int | None = None,
    scope_name: str | None = None,
    scope_version: str | None = None,
) -> dict[str, Any]:
    now = time.time_ns()
    entry: dict[str, Any] = {
        "timestamp_unix_nano": timestamp_ns or now,
        "observed_timestamp_unix_nano": observed_ns or now,
        "severity_number": severity_number,
        "severity_text": severity_text,
        "body": body,
        "attributes": attributes or {},
        "resource": resource,
        "service_name": str(resource.get("service.name", "unknown")),
    }
    if trace_id:
        entry["trace_id"] = trace_id.lower()
    if span_id:
        entry["span_id"] = span_id.lower()
    if scope_name:
        entry["instrumentation_scope_name"] = scope_name
    if scope_version:
        entry["instrumentation_scope_version"] = scope_version
    return entry


@contextmanager
def attached_handler(logger: logging.Logger, handler: logging.Handler) -> Iterator[None]:
    """``handler`` receives ``logger``'s records for the block."""
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class EngineLogHandler(logging.Handler):
    """Queues the engine's own log records (attached to the ``iii`` logger).

    :meth:`emit` runs in the thread and task that logged: it reads the open
    span and the causation depth there, makes the entry and puts it in
    ``intake`` (never waits, never stores, never calls a listener).
    """

    def __init__(self, intake: LogIntake, resource: dict[str, Any], level: str):
        super().__init__(_PY_LEVELS.get(level, logging.INFO))
        self.intake = intake
        self.resource = resource

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, STORED_MARK, False):
            return
        try:
            number, text = severity_of(record.levelno)
            span = CURRENT_SPAN.get()
            attributes: dict[str, Any] = {"logger": record.name}
            for key in ("worker_id", "invocation_id", "function_id"):
                value = getattr(record, key, None)
                if isinstance(value, str):
                    attributes[key] = truncate(value, MAX_MESSAGE_CHARS)
                elif value is not None:
                    attributes[key] = value
            self.intake.put(
                make_entry(
                    body=record_message(record),
                    severity_number=number,
                    severity_text=text,
                    resource=self.resource,
                    attributes=attributes,
                    trace_id=span.trace_id if span is not None else None,
                    span_id=span.span_id if span is not None else None,
                    timestamp_ns=int(record.created * 1e9),
                    scope_name=record.name,
                ),
                current_depth(),
            )
        except Exception:
            self.handleError(record)


def entries_from_otlp_json(payload: Any) -> list[dict[str, Any]]:
    """The log records of an OTLP/JSON ``ExportLogsServiceRequest``."""
    if not isinstance(payload, dict):
        raise ValueError("an OTLP logs payload must be a JSON object")
    out = []
    for resource_logs in payload.get("resourceLogs") or ():
        resource = otlp_attributes(((resource_logs or {}).get("resource") or {}).get("attributes"))
        for scope_logs in resource_logs.get("scopeLogs") or ():
            scope = scope_logs.get("scope") or {}
            for record in scope_logs.get("logRecords") or ():
                if not isinstance(record, dict):
                    continue
                trace_id = parse_otlp_id(record.get("traceId"), 16)
                span_id = parse_otlp_id(record.get("spanId"), 8)
                number = otlp_int(record.get("severityNumber"))
                out.append(
                    make_entry(
                        body=otlp_value(record.get("body")),
                        severity_number=number,
                        severity_text=str(record.get("severityText") or severity_of_number(number)),
                        resource=resource,
                        attributes=otlp_attributes(record.get("attributes")),
                        trace_id=format(trace_id, "032x") if trace_id else None,
                        span_id=format(span_id, "016x") if span_id else None,
                        timestamp_ns=otlp_int(record.get("timeUnixNano")) or None,
                        observed_ns=otlp_int(record.get("observedTimeUnixNano")) or None,
                        scope_name=scope.get("name") or None,
                        scope_version=scope.get("version") or None,
                    )
                )
    return out


def severity_of_number(number: int) -> str:
    for text, floor in (("ERROR", 17), ("WARN", 13), ("INFO", 9), ("DEBUG", 5)):
        if number >= floor:
            return text
    return "TRACE"


@attrs.define(eq=False)
class LogTriggers:
    """The ``log`` trigger type: which functions want which levels."""

    levels: dict[LogicalTrigger, str] = attrs.field(factory=dict)

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        config = trigger.config if isinstance(trigger.config, dict) else {}
        level = config.get("level", "all")
        if not isinstance(level, str) or level.lower() not in TRIGGER_LEVELS:
            raise TriggerRegistrationError(
                f"log trigger level must be one of {', '.join(TRIGGER_LEVELS)}, "
                f"got {bounded_repr(level)}"
            )
        self.levels[trigger] = level.lower()

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        self.levels.pop(trigger, None)

    def matching(self, entry: dict[str, Any]) -> list[LogicalTrigger]:
        level = str(entry.get("severity_text", "")).lower()
        if level == "warning":
            level = "warn"
        return [t for t, wanted in self.levels.items() if wanted == "all" or wanted == level]
