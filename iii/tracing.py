"""The engine's tracing hook: spans for invocations and for what modules do.

``engine.tracer`` is an :class:`EngineTracer`.  The default one does nothing
(``enabled`` is False and :meth:`Engine.invoke` skips it with one attribute
check); the observability module installs one backed by the OpenTelemetry SDK.

Modules wrap the work a trigger does in a span and pass its context on::

    with engine.tracer.span(
        f"POST /users", kind="server", traceparent=headers.get("traceparent"),
        baggage=headers.get("baggage"), attributes={"http.request.method": "POST"},
    ) as span:
        result = await engine.invoke(function_id, payload,
                                     traceparent=span.traceparent, baggage=span.baggage)
        span.set_attribute("http.response.status_code", 200)

With the no-op tracer ``span.traceparent`` / ``span.baggage`` are the values
given, so the incoming context still reaches the worker.  An :class:`IIIError`
leaving the block marks the span as an error with its code; the tracer never
swallows an exception.  Spans are explicit values, not "current span" state,
so a span may be handed to another task.

Kinds: ``"server"``, ``"client"``, ``"producer"``, ``"consumer"``, ``"internal"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Span", "NoopSpan", "EngineTracer", "NOOP_TRACER"]


class Span(Protocol):
    """What a module may do with a span while it is open."""

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` of this span, to pass to what it calls."""

    @property
    def baggage(self) -> str | None:
        """The W3C ``baggage`` to pass on."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def set_error(self, code: str, message: str = "") -> None:
        """Mark the span failed (without an exception leaving the block)."""


class NoopSpan:
    """Passes the given context through unchanged (tracing off)."""

    __slots__ = ("traceparent", "baggage")

    def __init__(self, traceparent: str | None, baggage: str | None):
        self.traceparent = traceparent
        self.baggage = baggage

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_error(self, code: str, message: str = "") -> None:
        pass


class EngineTracer:
    """The tracing hook; this base class is the no-op default."""

    enabled: bool = False

    @property
    def records_spans(self) -> bool:
        """True if spans have their own trace context (not just the caller's)."""
        return False

    @contextmanager
    def span(
        self,
        name: str,
        *,
        kind: str = "internal",
        traceparent: str | None = None,
        baggage: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[Span]:
        """A span around a unit of work (HTTP request, queue job, cron firing ...)."""
        yield NoopSpan(traceparent, baggage)

    @contextmanager
    def invocation(
        self,
        function_id: str,
        *,
        traceparent: str | None = None,
        baggage: str | None = None,
        caller_worker_id: str | None = None,
        invocation_id: str | None = None,
    ) -> Iterator[Span]:
        """The span of one :meth:`Engine.invoke` (also counted in the invocation metrics)."""
        yield NoopSpan(traceparent, baggage)


NOOP_TRACER = EngineTracer()
