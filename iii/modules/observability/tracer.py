"""The engine tracer backed by the OpenTelemetry SDK (installed as ``engine.tracer``).

Every span is started explicitly from the ``traceparent`` it is given (W3C
trace context, parsed by OpenTelemetry's propagator) and never becomes
"current" OpenTelemetry context, so spans can cross trio tasks safely.  The
span's own context is what a module or :meth:`Engine.invoke` passes on:
``span.traceparent`` is ``00-<trace>-<span>-<flags>`` of the new span (the
flags carry the sampling decision), ``span.baggage`` is the caller's baggage
unchanged.

An invocation span is named ``call <function_id>`` (kind server, as upstream)
with ``faas.invoked_name``, ``function_id``, ``iii.function.kind``
(``internal`` for ``engine::`` ids), ``iii.invocation.id``,
``iii.caller.worker_id`` and ``iii.worker.id`` (where it ran), and status
ok / error (``iii.error.code``).  Each invocation is also counted in
:class:`~iii.modules.observability.metrics.EngineMetrics`, sampled or not.

While a span is open in a task, :data:`CURRENT_SPAN` holds it, so engine log
records written in that task carry its trace and span ids.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import trio
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from iii.errors import IIIError
from iii.modules.observability.metrics import EngineMetrics
from iii.tracing import EngineTracer, NoopSpan, Span

__all__ = ["OtelTracer", "CURRENT_SPAN", "SpanHandle"]

_KINDS = {
    "server": SpanKind.SERVER,
    "client": SpanKind.CLIENT,
    "producer": SpanKind.PRODUCER,
    "consumer": SpanKind.CONSUMER,
    "internal": SpanKind.INTERNAL,
}
_PROPAGATOR = TraceContextTextMapPropagator()

CURRENT_SPAN: contextvars.ContextVar[SpanHandle | None] = contextvars.ContextVar(
    "iii_current_span", default=None
)


class SpanHandle:
    """The :class:`iii.tracing.Span` given to callers, over an OpenTelemetry span."""

    __slots__ = ("otel", "baggage", "_fallback", "failed")

    def __init__(self, otel: trace_api.Span, traceparent: str | None, baggage: str | None):
        self.otel = otel
        self.baggage = baggage
        self._fallback = traceparent
        self.failed = False

    @property
    def traceparent(self) -> str | None:
        context = self.otel.get_span_context()
        if not context.is_valid:
            return self._fallback
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    @property
    def trace_id(self) -> str:
        return format(self.otel.get_span_context().trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self.otel.get_span_context().span_id, "016x")

    def set_attribute(self, key: str, value: Any) -> None:
        self.otel.set_attribute(key, value)

    def set_error(self, code: str, message: str = "") -> None:
        self.failed = True
        self.otel.set_attribute("iii.error.code", code)
        self.otel.set_status(Status(StatusCode.ERROR, f"{code}: {message}" if message else code))


class OtelTracer(EngineTracer):
    enabled = True

    def __init__(self, tracer: trace_api.Tracer | None, metrics: EngineMetrics):
        self.tracer = tracer  # None: traces off (``enabled: false``), metrics still counted
        self.metrics = metrics

    @property
    def records_spans(self) -> bool:
        return self.tracer is not None

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
        if self.tracer is None:
            yield NoopSpan(traceparent, baggage)
            return
        with self._open(
            name, _KINDS.get(kind, SpanKind.INTERNAL), traceparent, baggage, attributes
        ) as handle:
            yield handle

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
        started = time.perf_counter()
        error_code: str | None = "cancelled"
        try:
            if self.tracer is None:
                yield NoopSpan(traceparent, baggage)
            else:
                attributes: dict[str, Any] = {
                    "faas.invoked_name": function_id,
                    "faas.trigger": "other",
                    "function_id": function_id,
                    "iii.function.kind": "internal"
                    if function_id.startswith("engine::")
                    else "user",
                }
                if invocation_id is not None:
                    attributes["iii.invocation.id"] = invocation_id
                if caller_worker_id is not None:
                    attributes["iii.caller.worker_id"] = caller_worker_id
                with self._open(
                    f"call {function_id}", SpanKind.SERVER, traceparent, baggage, attributes
                ) as handle:
                    yield handle
            error_code = None
        except IIIError as exc:
            error_code = exc.code
            raise
        except trio.Cancelled:
            raise
        except Exception:
            error_code = "invocation_error"
            raise
        finally:
            self.metrics.record_invocation(function_id, time.perf_counter() - started, error_code)

    @contextmanager
    def _open(
        self,
        name: str,
        kind: SpanKind,
        traceparent: str | None,
        baggage: str | None,
        attributes: Mapping[str, Any] | None,
    ) -> Iterator[SpanHandle]:
        assert self.tracer is not None
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        otel_span = self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        handle = SpanHandle(otel_span, traceparent, baggage)
        token = CURRENT_SPAN.set(handle)
        try:
            yield handle
        except IIIError as exc:
            handle.set_error(exc.code, exc.message)
            raise
        except trio.Cancelled:
            otel_span.set_status(Status(StatusCode.ERROR, "cancelled"))
            raise
        except Exception as exc:
            otel_span.record_exception(exc)
            otel_span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        else:
            if not handle.failed:
                otel_span.set_status(Status(StatusCode.OK))
        finally:
            CURRENT_SPAN.reset(token)
            otel_span.end()
