"""The observability module's handler for the engine's own log records.

What it stores is also what ``log`` triggers receive and what the OTLP log
exporter sends, so its bound is checked here, at the one place records enter.
"""

from __future__ import annotations

import logging

from iii.log import MAX_MESSAGE_CHARS
from iii.modules.observability.log_intake import LogIntake
from iii.modules.observability.logs import EngineLogHandler, LogStore


def test_engine_records_are_stored_bounded_but_not_escaped() -> None:
    store, intake = LogStore(10), LogIntake(1 << 20)
    handler = EngineLogHandler(intake, {"service.name": "iii"}, "info")
    huge = "n" * (10 * MAX_MESSAGE_CHARS)
    record = logging.LogRecord(
        "iii.worker_conn", logging.WARNING, __file__, 1, "worker %s\n(name %r)", ("w1", huge), None
    )
    record.function_id = "f" * (10 * MAX_MESSAGE_CHARS)
    handler.emit(record)
    (pending,) = intake.take()
    store.add(pending.entry)
    (entry,) = store.entries()
    body = entry["body"]
    assert body.startswith("worker w1\n(name 'nnn")  # a newline is data in a JSON store
    assert len(body) <= MAX_MESSAGE_CHARS + 40 and body.endswith("more chars)")
    assert len(entry["attributes"]["function_id"]) <= MAX_MESSAGE_CHARS + 40
    assert entry["severity_text"] == "WARN"
