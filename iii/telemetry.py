"""The sink for telemetry that SDK workers send to the engine.

SDKs send OpenTelemetry JSON as binary frames prefixed ``OTLP`` (spans),
``MTRC`` (metrics) or ``LOGS`` (logs), on the worker socket or on the
telemetry-only ``/otel`` socket.  The engine hands every such frame to
``engine.telemetry.ingest``.  Without the observability module the sink only
counts what it receives; the observability module installs a consumer that
stores the data.

A frame the consumer cannot read is dropped with one warning line (no
traceback: the frame is the peer's fault, not the engine's), through the
caller's :class:`~iii.log.RateLimitedLog` (one per connection), so a peer
sending bad frames in a loop adds a few lines, not one per frame.

Lifetime: one sink per engine (``engine.telemetry``); the observability module
sets its consumer for the module's run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs

from iii.log import RateLimitedLog, describe_error

__all__ = ["TelemetrySink", "TelemetryConsumer"]

log = logging.getLogger(__name__)

TelemetryConsumer = Callable[[str, bytes, "str | None"], None]


@attrs.define(eq=False)
class TelemetrySink:
    counts: dict[str, int] = attrs.field(factory=lambda: {"OTLP": 0, "MTRC": 0, "LOGS": 0})
    bytes_received: int = 0
    consumer: TelemetryConsumer | None = None
    frames_dropped: int = 0
    # For callers without a connection of their own.
    bad_frame_log: RateLimitedLog = attrs.field(factory=lambda: RateLimitedLog(log))

    def ingest(
        self, frame: bytes, worker_id: str | None, bad_frame_log: RateLimitedLog | None = None
    ) -> None:
        """Take one prefixed telemetry frame; errors are logged (rate-limited), never raised.

        ``bad_frame_log``: the sending connection's limiter.
        """
        kind = frame[:4].decode("ascii", "replace")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.bytes_received += len(frame)
        if self.consumer is None:
            return
        try:
            self.consumer(kind, frame[4:], worker_id)
        except Exception as exc:
            self.frames_dropped += 1
            (bad_frame_log or self.bad_frame_log).warning(
                "%s sent an unreadable %s frame of %d bytes (dropped): %s",
                f"worker {worker_id}" if worker_id else "a telemetry socket",
                kind,
                len(frame),
                describe_error(exc),
                logger=log,
            )
