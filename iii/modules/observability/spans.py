"""Spans: the memory store and its queries, span size bounds, and SDK span ingestion.

* :class:`SpanStore` keeps the last ``memory_max_spans`` finished spans, and
  at most ``memory_max_bytes`` of them (the oldest evicted first), and answers
  ``engine::traces::list`` / ``tree`` with upstream's span JSON (spec
  modules.md §8), built per query.
  Each span is counted and cut to ``span_max_bytes`` by :mod:`.span_bounds`.
* :class:`MemorySpanProcessor` is the OpenTelemetry ``SpanProcessor`` that
  feeds the store.
* :func:`spans_from_otlp_json` turns an SDK's ``OTLP`` frame (OTLP/JSON
  ``resourceSpans``, ids in hex, or base64 as protobuf's JSON mapping writes
  them) into OpenTelemetry ``ReadableSpan`` objects.  The module hands those
  to the same span processors as its own spans, so a worker's spans land in
  the memory store and go to the OTLP exporter exactly like the engine's, and
  a trace's tree holds both.

Lifetime: owned by the observability module; everything here is synchronous.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from iii.modules.observability.bounds import BoundedRing
from iii.modules.observability.span_bounds import fit_span

__all__ = [
    "SpanStore",
    "StoredSpan",
    "MemorySpanProcessor",
    "otlp_int",
    "span_to_json",
    "spans_from_otlp_json",
    "otlp_value",
    "otlp_attributes",
    "parse_otlp_id",
]

_STATUS_NAMES = {StatusCode.UNSET: "unset", StatusCode.OK: "ok", StatusCode.ERROR: "error"}
# OTLP's SpanKind enum (0 = unspecified); the Python SDK's enum starts at INTERNAL = 0.
_OTLP_KINDS = {
    1: SpanKind.INTERNAL,
    2: SpanKind.SERVER,
    3: SpanKind.CLIENT,
    4: SpanKind.PRODUCER,
    5: SpanKind.CONSUMER,
}
_OTLP_STATUS = {0: StatusCode.UNSET, 1: StatusCode.OK, 2: StatusCode.ERROR}


def _attr_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def span_to_json(span: ReadableSpan) -> dict[str, Any]:
    """Upstream's stored-span JSON for an OpenTelemetry span."""
    context = span.context
    assert context is not None
    attributes = span.attributes or {}
    resource = span.resource.attributes if span.resource is not None else {}
    out: dict[str, Any] = {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "name": span.name,
        "start_time_unix_nano": span.start_time or 0,
        "end_time_unix_nano": span.end_time or 0,
        "status": _STATUS_NAMES.get(span.status.status_code, "unset"),
        "attributes": [[key, _attr_json(value)] for key, value in attributes.items()],
        "service_name": str(resource.get("service.name", "unknown")),
        "events": [
            {
                "name": event.name,
                "timestamp_unix_nano": event.timestamp,
                "attributes": [[k, _attr_json(v)] for k, v in (event.attributes or {}).items()],
            }
            for event in span.events
        ],
        "links": [
            {
                "trace_id": format(link.context.trace_id, "032x"),
                "span_id": format(link.context.span_id, "016x"),
                "attributes": [[k, _attr_json(v)] for k, v in (link.attributes or {}).items()],
            }
            for link in span.links
        ],
        "flags": int(context.trace_flags),
    }
    if span.parent is not None and span.parent.span_id:
        out["parent_span_id"] = format(span.parent.span_id, "016x")
    if span.status.description:
        out["status_description"] = span.status.description
    scope = span.instrumentation_scope
    if scope is not None:
        out["instrumentation_scope_name"] = scope.name
        if scope.version:
            out["instrumentation_scope_version"] = scope.version
    return out


@attrs.define(slots=True, eq=False)
class StoredSpan:
    """A finished span; its JSON is built when a query asks (not on the hot path,
    and not kept: the store's byte bound counts the span only)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    span: ReadableSpan

    @classmethod
    def of(cls, span: ReadableSpan) -> StoredSpan:
        context = span.context
        assert context is not None
        parent = span.parent.span_id if span.parent is not None else 0
        return cls(
            format(context.trace_id, "032x"),
            format(context.span_id, "016x"),
            format(parent, "016x") if parent else None,
            span,
        )

    def json(self) -> dict[str, Any]:
        return span_to_json(self.span)


class SpanStore:
    """Finished spans, oldest evicted first, with upstream's queries (see the module docstring)."""

    def __init__(
        self,
        max_spans: int,
        max_bytes: int = 16 * 1024 * 1024,
        max_span_bytes: int = 64 * 1024,
    ):
        self.max_span_bytes = max_span_bytes
        self._ring = BoundedRing[StoredSpan](max_spans, max_bytes)

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def bytes(self) -> int:
        """The bytes the stored spans are counted for (at most ``max_bytes``)."""
        return self._ring.bytes

    @property
    def spans(self) -> list[StoredSpan]:
        """The stored spans, oldest first."""
        return list(self._ring)

    def add(self, span: ReadableSpan) -> None:
        span, size = fit_span(span, self.max_span_bytes)
        self._ring.add(StoredSpan.of(span), size)

    def clear(self) -> None:
        self._ring.clear()

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        trace_id = trace_id.lower()
        return [s.json() for s in self._ring if s.trace_id == trace_id]

    def roots(self) -> Iterator[dict[str, Any]]:
        """Spans without a parent, or whose parent is not stored (e.g. a caller
        that does not export its spans): the entry points of the stored traces."""
        spans = self.spans
        present = {(s.trace_id, s.span_id) for s in spans}
        for span in spans:
            if span.parent_span_id is None or (span.trace_id, span.parent_span_id) not in present:
                yield span.json()

    def tree(self, trace_id: str) -> list[dict[str, Any]]:
        spans = sorted(self.trace(trace_id), key=lambda s: s["start_time_unix_nano"])
        nodes = {s["span_id"]: {**s, "children": []} for s in spans}
        roots = []
        for span in spans:
            node = nodes[span["span_id"]]
            parent = nodes.get(span.get("parent_span_id") or "")
            if parent is None or parent is node:
                roots.append(node)
            else:
                parent["children"].append(node)
        return roots


def is_internal(span: dict[str, Any]) -> bool:
    for key, value in span["attributes"]:
        if key == "function_id" and isinstance(value, str) and value.startswith("engine::"):
            return True
        if key == "iii.function.kind" and value == "internal":
            return True
    return False


class MemorySpanProcessor(SpanProcessor):
    """Stores every ended, sampled span."""

    def __init__(self, store: SpanStore):
        self.store = store

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self.store.add(span)


# -- OTLP/JSON ingestion ------------------------------------------------------------------


def parse_otlp_id(value: Any, size: int) -> int:
    """A trace (16 bytes) or span (8 bytes) id: hex as OTLP/JSON says, or base64."""
    if not isinstance(value, str) or not value:
        return 0
    if len(value) == size * 2:
        try:
            return int(value, 16)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return 0
    return int.from_bytes(raw, "big") if len(raw) == size else 0


def otlp_value(value: Any) -> Any:
    """An OTLP ``AnyValue`` as a plain value (attributes must be scalars or lists)."""
    if not isinstance(value, dict):
        return value
    if "stringValue" in value:
        return str(value["stringValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        try:
            number = int(value["intValue"])
        except (TypeError, ValueError, OverflowError):
            return str(value["intValue"])
        # Beyond 64 bits neither OTLP nor the engine's JSON can carry it.
        return number if -(2**63) <= number < 2**63 else str(value["intValue"])
    if "doubleValue" in value:
        try:
            return float(value["doubleValue"])
        except (TypeError, ValueError):
            return str(value["doubleValue"])
    if "arrayValue" in value:
        items = [otlp_value(v) for v in (value["arrayValue"] or {}).get("values") or []]
        if all(isinstance(i, str) for i in items) or all(isinstance(i, bool) for i in items):
            return tuple(items)
        if all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in items):
            return tuple(items)
        return orjson.dumps(items, default=str).decode()
    if "kvlistValue" in value:
        pairs = {
            kv.get("key"): otlp_value(kv.get("value"))
            for kv in (value["kvlistValue"] or {}).get("values") or []
        }
        return orjson.dumps(pairs, default=str).decode()
    if "bytesValue" in value:
        return str(value["bytesValue"])
    return None


def otlp_attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            value = otlp_value(item.get("value"))
            if value is not None:
                out[item["key"]] = value
    return out


def otlp_int(value: Any) -> int:
    """An OTLP integer (JSON number or decimal string); 0 if unreadable or beyond 64 bits."""
    try:
        number = int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return number if -(2**63) <= number < 2**64 else 0


def _context(trace_id: int, span_id: int) -> SpanContext:
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )


def spans_from_otlp_json(payload: Any, *, worker_id: str | None = None) -> Iterable[ReadableSpan]:
    """The spans of an OTLP/JSON ``ExportTraceServiceRequest``; malformed spans are skipped."""
    if not isinstance(payload, dict):
        raise ValueError("an OTLP span payload must be a JSON object")
    for resource_spans in payload.get("resourceSpans") or ():
        resource_attributes = otlp_attributes(
            ((resource_spans or {}).get("resource") or {}).get("attributes")
        )
        if worker_id is not None:
            resource_attributes.setdefault("iii.worker.id", worker_id)
        resource = Resource(resource_attributes)
        for scope_spans in (
            resource_spans.get("scopeSpans")
            or resource_spans.get("instrumentationLibrarySpans")
            or ()
        ):
            scope_json = scope_spans.get("scope") or scope_spans.get("instrumentationLibrary") or {}
            scope = InstrumentationScope(
                str(scope_json.get("name") or ""), scope_json.get("version") or None
            )
            for span in scope_spans.get("spans") or ():
                trace_id = parse_otlp_id(span.get("traceId"), 16)
                span_id = parse_otlp_id(span.get("spanId"), 8)
                if not trace_id or not span_id:
                    continue
                parent_id = parse_otlp_id(span.get("parentSpanId"), 8)
                status = span.get("status") or {}
                status_code = _OTLP_STATUS.get(otlp_int(status.get("code")), StatusCode.UNSET)
                links = [
                    Link(
                        _context(
                            parse_otlp_id(link.get("traceId"), 16),
                            parse_otlp_id(link.get("spanId"), 8),
                        ),
                        otlp_attributes(link.get("attributes")),
                    )
                    for link in span.get("links") or ()
                    if isinstance(link, dict)
                ]
                yield ReadableSpan(  # built from a remote export, as an exporter bridge does
                    name=str(span.get("name") or ""),
                    context=_context(trace_id, span_id),
                    parent=_context(trace_id, parent_id) if parent_id else None,
                    resource=resource,
                    attributes=otlp_attributes(span.get("attributes")),
                    events=[
                        Event(
                            str(event.get("name") or ""),
                            otlp_attributes(event.get("attributes")),
                            otlp_int(event.get("timeUnixNano")),
                        )
                        for event in span.get("events") or ()
                        if isinstance(event, dict)
                    ],
                    links=links,
                    kind=_OTLP_KINDS.get(otlp_int(span.get("kind")), SpanKind.INTERNAL),
                    status=Status(
                        status_code,
                        # OpenTelemetry keeps a description for errors only.
                        (status.get("message") or None)
                        if status_code is StatusCode.ERROR
                        else None,
                    ),
                    start_time=otlp_int(span.get("startTimeUnixNano")),
                    end_time=otlp_int(span.get("endTimeUnixNano")),
                    instrumentation_scope=scope,
                )
