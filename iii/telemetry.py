"""The sink for telemetry that SDK workers send to the engine.

SDKs send OpenTelemetry JSON as binary frames prefixed ``OTLP`` (spans),
``MTRC`` (metrics) or ``LOGS`` (logs), on the worker socket or on the
telemetry-only ``/otel`` socket.  The engine hands every such frame to
``engine.telemetry.ingest``.  Without the observability module the sink only
counts what it receives; the observability module installs a consumer that
stores the data.

Lifetime: one sink per engine (``engine.telemetry``); the observability module
sets its consumer for the module's run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

__all__ = ["TelemetrySink", "TelemetryConsumer"]

log = logging.getLogger(__name__)

TelemetryConsumer = Callable[[str, bytes, "str | None"], None]


@attrs.define(eq=False)
class TelemetrySink:
    counts: dict[str, int] = attrs.field(factory=lambda: {"OTLP": 0, "MTRC": 0, "LOGS": 0})
    bytes_received: int = 0
    consumer: TelemetryConsumer | None = None

    def ingest(self, frame: bytes, worker_id: str | None) -> None:
        """Take one prefixed telemetry frame; errors are logged, never raised."""
        kind = frame[:4].decode("ascii", "replace")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.bytes_received += len(frame)
        if self.consumer is None:
            return
        try:
            self.consumer(kind, frame[4:], worker_id)
        except Exception:
            log.warning("telemetry ingest failed for a %s frame", kind, exc_info=True)
