"""Span size bounds: what a span is counted for, and cutting one to fit.

* :func:`span_bytes` estimates the memory a span holds: its strings at their
  in-memory size (``sys.getsizeof``) plus a fixed overhead per span, event,
  link and attribute.  For ASCII text that is never less than the span's JSON.
* :func:`fit_span` cuts a span over the bound (``span_max_bytes``): the name
  and the status text keep their head (with a note of how much was left
  out), attributes keep the smallest whole and cut the first long string to
  the room left, events and links are kept in order while they fit (an event
  that does not fit whole keeps what fits of its attributes), a resource over
  an eighth of the bound is cut the same way, and the attribute
  ``iii.truncated`` says what happened.  Ids, times, kind and status code are
  kept, so the span stays in its trace.  OpenTelemetry's own span limits count
  attributes and characters, not bytes, and the engine builds SDK spans
  itself, so this is done here.
* :class:`BoundedSpanProcessor` fits every span the engine ends or an SDK
  sends, once, before the memory store and the OTLP exporter see it.

Lifetime: none: pure functions, and a processor owned by the observability
module's tracer provider.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, Status, StatusCode

from iii.modules.observability.bounds import NOTE_KEY, keep_smallest

__all__ = ["BoundedSpanProcessor", "span_bytes", "fit_span", "SPAN_OVERHEAD"]


class BoundedSpanProcessor(SpanProcessor):
    """Cuts each ended span to ``max_span_bytes`` (:func:`fit_span`) once, then hands
    it to the sinks (the memory store's processor, the OTLP batch processor)."""

    def __init__(self, sinks: list[SpanProcessor], max_span_bytes: int):
        self.sinks = sinks
        self.max_span_bytes = max_span_bytes

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        for sink in self.sinks:
            sink.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        fitted, _ = fit_span(span, self.max_span_bytes)
        for sink in self.sinks:
            sink.on_end(fitted)

    def shutdown(self) -> None:
        for sink in self.sinks:
            sink.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all([sink.force_flush(timeout_millis) for sink in self.sinks])


# -- span size ----------------------------------------------------------------------------

# Bytes counted on top of the strings: a span (the ReadableSpan, its context,
# status, scope, the containers and the JSON's fixed fields), an event, a
# link, an attribute (its slot in the dict), a number.
SPAN_OVERHEAD = 1024
EVENT_OVERHEAD = 160
LINK_OVERHEAD = 200
ITEM_OVERHEAD = 16
NUMBER_BYTES = 32
# What a span's short texts (name, status description, event names) keep when cut.
SHORT_TEXT_BYTES = 1024
_EMPTY_STR = sys.getsizeof("")


def _value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return sys.getsizeof(value)
    if isinstance(value, (tuple, list)):
        return sys.getsizeof(value) + sum(_value_bytes(item) for item in value)
    return NUMBER_BYTES


def _attributes_bytes(attributes: Mapping[str, Any] | None) -> int:
    if not attributes:
        return 0
    return sum(
        sys.getsizeof(key) + _value_bytes(value) + ITEM_OVERHEAD
        for key, value in attributes.items()
    )


def _event_bytes(event: Event) -> int:
    return EVENT_OVERHEAD + sys.getsizeof(event.name) + _attributes_bytes(event.attributes)


def _link_bytes(link: Link) -> int:
    return LINK_OVERHEAD + _attributes_bytes(link.attributes)


def span_bytes(span: ReadableSpan) -> int:
    """The memory ``span`` is counted for (see the module docstring)."""
    size = SPAN_OVERHEAD + sys.getsizeof(span.name) + _attributes_bytes(span.attributes)
    if span.status.description:
        size += sys.getsizeof(span.status.description)
    size += sum(_event_bytes(event) for event in span.events)
    size += sum(_link_bytes(link) for link in span.links)
    if span.resource is not None:
        size += _attributes_bytes(span.resource.attributes)
    scope = span.instrumentation_scope
    if scope is not None:
        size += sys.getsizeof(scope.name) + sys.getsizeof(scope.version or "")
    return size


def _cut_str(text: str, limit: int) -> str:
    """The head of ``text`` whose in-memory size, with the note of what was cut, is at
    most ``limit`` bytes (at least an empty string)."""
    if sys.getsizeof(text) <= limit:
        return text
    count = max(0, limit - _EMPTY_STR - 64)
    while True:
        cut = text[:count] + f"… ({len(text) - count} more chars)"
        size = sys.getsizeof(cut)
        if size <= limit or count == 0:
            return cut if size <= limit else ""
        count = max(0, min(count - 1, count * limit // size - 1))


def _fit_attributes(attributes: Mapping[str, Any] | None, limit: int) -> dict[str, Any]:
    """The smallest attributes kept whole while they fit, then the first string that did
    not fit cut to the room left; in their order."""
    if not attributes:
        return {}
    if _attributes_bytes(attributes) <= limit:
        return dict(attributes)
    sizes = {
        key: sys.getsizeof(key) + _value_bytes(value) + ITEM_OVERHEAD
        for key, value in attributes.items()
    }
    whole, room = keep_smallest(sizes, limit)
    cut: dict[str, str] = {}  # at most one
    for key, value in attributes.items():
        if key not in whole and isinstance(value, str):
            value_room = room - sys.getsizeof(key) - ITEM_OVERHEAD
            if value_room > _EMPTY_STR + 128:
                cut[key] = _cut_str(value, value_room)
            break
    return {
        key: cut.get(key, value) for key, value in attributes.items() if key in whole or key in cut
    }


def fit_span(span: ReadableSpan, limit: int) -> tuple[ReadableSpan, int]:
    """``span`` within ``limit`` bytes (:func:`span_bytes`), and its size."""
    size = span_bytes(span)
    if size <= limit:
        return span, size
    note = f"this span was {size} bytes, over the limit of {limit}: values were cut"
    resource = span.resource
    if resource is not None and _attributes_bytes(resource.attributes) > limit // 8:
        resource = Resource(_fit_attributes(resource.attributes, limit // 8))
    name = _cut_str(span.name, SHORT_TEXT_BYTES)
    description = span.status.description
    if description:
        description = _cut_str(description, SHORT_TEXT_BYTES)
    fixed = SPAN_OVERHEAD + sys.getsizeof(name) + sys.getsizeof(description or "")
    fixed += _attributes_bytes({NOTE_KEY: note})
    if resource is not None:
        fixed += _attributes_bytes(resource.attributes)
    scope = span.instrumentation_scope
    if scope is not None:
        scope_name = _cut_str(scope.name, SHORT_TEXT_BYTES)
        scope_version = _cut_str(scope.version, SHORT_TEXT_BYTES) if scope.version else None
        scope = InstrumentationScope(scope_name, scope_version)
        fixed += sys.getsizeof(scope_name) + sys.getsizeof(scope_version or "")
    budget = max(0, limit - fixed)
    events_size = sum(_event_bytes(event) for event in span.events)
    links_size = sum(_link_bytes(link) for link in span.links)
    # Attributes first, but events and links keep up to half the room if they need it.
    attributes_share = budget - min(events_size + links_size, budget // 2)
    attributes = _fit_attributes(span.attributes, attributes_share)
    room = budget - _attributes_bytes(attributes)
    events = []
    for event in span.events:
        event_size = _event_bytes(event)
        if event_size > room:
            event_name = _cut_str(event.name, SHORT_TEXT_BYTES)
            left = room - EVENT_OVERHEAD - sys.getsizeof(event_name)
            if left > 0:
                event = Event(event_name, _fit_attributes(event.attributes, left), event.timestamp)
                event_size = _event_bytes(event)
            if event_size > room:
                break
        events.append(event)
        room -= event_size
    links = []
    for link in span.links:
        link_size = _link_bytes(link)
        if link_size > room:
            break
        links.append(link)
        room -= link_size
    attributes[NOTE_KEY] = note
    fitted = ReadableSpan(
        name=name,
        context=span.context,
        parent=span.parent,
        resource=resource,
        attributes=attributes,
        events=events,
        links=links,
        kind=span.kind,
        # OpenTelemetry keeps a description for errors only.
        status=Status(span.status.status_code, description)
        if span.status.status_code is StatusCode.ERROR
        else Status(span.status.status_code),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=scope,
    )
    return fitted, span_bytes(fitted)
