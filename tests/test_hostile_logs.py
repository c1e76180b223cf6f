"""Issue 10 rows 7 and 9, replayed against a real engine process.

Each test runs ``python -m iii serve`` (:class:`tests.support.EngineProcess`),
attacks it over real sockets with raw WebSocket clients, and reads back the
engine's stderr (the log file the process writes):

* row 7, log injection: peer strings carrying line breaks and a forged record
  (a worker's name, a trigger id, an ``engine::log::info`` message) appear in
  the log only escaped, inside the record they belong to;
* row 9, log amplification: malformed frames of several MiB, and a flood of
  bad telemetry frames, add only a bounded amount of log.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import wrap_client_stream

from iii.testing import RawWorker
from tests.support import EngineProcess, reserve_port, running_engine

# The engine's record format: "<asctime> <LEVEL> <logger>: <message>".
RECORD = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: "
)
# What an attacker would like a log reader to see as a record of its own.
FORGED_RECORD = "2001-01-01 00:00:00,000 CRITICAL iii.engine: FORGED"
# Line separators a log reader (or str.splitlines) may honour, and a terminal
# escape that erases the current line before the forged one is printed.
SEPARATORS = ("\n", "\r", "\u2028", "\x1b[2K\r", "\x85")

OBSERVABILITY = {
    "class": "modules::observability::OtelModule",
    "config": {"enabled": True, "exporter": "memory", "prometheus_enabled": False},
}

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _info_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_LOG_LEVEL", "info")


@asynccontextmanager
async def raw_worker(port: int, path: str = "/") -> AsyncIterator[RawWorker]:
    """A raw WebSocket worker on a socket this helper owns and always closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, "127.0.0.1", path, message_queue_size=64, max_message_size=64 * MiB
        )
        worker = RawWorker(ws)
        if path == "/":
            registered = await worker.receive(timeout=10)
            assert registered["type"] == "workerregistered"
            worker.worker_id = registered["worker_id"]
        try:
            yield worker
        finally:
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def wait_for_log(engine: EngineProcess, predicate: Any, timeout: float = 20) -> str:
    with trio.fail_after(timeout):
        while True:
            text = engine.log_text()
            if predicate(text):
                return text
            await trio.sleep(0.1)


async def still_serves(engine: EngineProcess) -> None:
    async with raw_worker(engine.port) as worker:
        await worker.send({"type": "ping"})
        assert (await worker.receive_type("pong", timeout=10)) == {"type": "pong"}


async def http_get(port: int, target: str) -> str:
    """The body of a plain HTTP/1.0 GET (the Prometheus endpoint)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        response = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                response += chunk
    return response.partition(b"\r\n\r\n")[2].decode()


def assert_no_forged_record(text: str) -> None:
    """No line of the log, however a reader splits it, starts with the forgery,
    and each forged text sits inside one real record."""
    for line in text.splitlines():
        assert not line.startswith("2001-"), f"forged record in the log: {line!r}"
        if "FORGED" in line:
            assert RECORD.match(line), f"forged text outside a real record: {line!r}"
            assert not line.lstrip().startswith("2001-")


# -- row 7: log injection ------------------------------------------------------------------


async def test_peer_strings_cannot_forge_log_records(tmp_path: Path) -> None:
    async with running_engine(tmp_path, {"modules": [OBSERVABILITY]}) as engine:
        names = [f"x{sep}{FORGED_RECORD}-name-{i}" for i, sep in enumerate(SEPARATORS)]
        for name in names:
            async with raw_worker(engine.port) as worker:
                reply = await worker.call("engine::workers::register", {"name": name}, timeout=10)
                assert "error" not in reply, reply
                # A trigger registration the engine refuses (and logs, with the peer's id).
                await worker.send(
                    {
                        "type": "registertrigger",
                        "id": f"t\n{FORGED_RECORD}-trigger",
                        "trigger_type": "log",
                        "function_id": "any::f",
                        "config": {"level": "bogus"},
                    }
                )
                refused = await worker.receive_type("triggerregistrationresult", timeout=10)
                assert refused["error"]["code"]
                # A worker's log line, echoed to the engine's console output.
                reply = await worker.call(
                    "engine::log::warn", {"message": f"m\r\n{FORGED_RECORD}-log"}, timeout=10
                )
                assert "error" not in reply, reply
        # Each worker's name is logged when it disconnects.
        text = await wait_for_log(
            engine, lambda t: all(f"-name-{i}" in t for i in range(len(SEPARATORS)))
        )
        await still_serves(engine)
    assert "FORGED" in text
    assert text.count("-trigger") >= len(SEPARATORS) and text.count("-log") >= len(SEPARATORS)
    assert_no_forged_record(text)


# -- row 9: log amplification --------------------------------------------------------------


async def test_huge_malformed_frames_add_a_bounded_amount_of_log(tmp_path: Path) -> None:
    size = 4 * MiB
    frames = [
        # An unknown message type, 4 MiB long.
        orjson.dumps({"type": "x" * size}),
        # A call whose invocation id is 4 MiB of garbage.
        orjson.dumps({"type": "invokefunction", "function_id": "f", "invocation_id": "y" * size}),
        # A result whose invocation id is 4 MiB of garbage.
        orjson.dumps({"type": "invocationresult", "function_id": "f", "invocation_id": "z" * size}),
        # An unknown type that is a 4 MiB list.
        orjson.dumps({"type": ["w"] * (size // 4)}),
    ]
    async with running_engine(tmp_path, {"modules": [OBSERVABILITY]}) as engine:
        await still_serves(engine)
        before = len(engine.log_text())
        async with raw_worker(engine.port) as worker:
            for frame in frames:
                await worker.send(frame.decode())
            # A worker's own 4 MiB log line, echoed to the console.
            reply = await worker.call("engine::log::info", {"message": "v" * size}, timeout=30)
            assert "error" not in reply, reply
            await worker.send({"type": "ping"})
            assert (await worker.receive_type("pong", timeout=30)) == {"type": "pong"}
        text = await wait_for_log(engine, lambda t: "disconnected" in t[before:])
        await still_serves(engine)
    grown = len(text) - before
    assert grown < 64 * 1024, f"{grown} bytes of log for {len(frames) + 1} frames of {size} bytes"


async def test_bad_telemetry_frames_log_a_bounded_number_of_lines(tmp_path: Path) -> None:
    prometheus_port = reserve_port()
    observability = {
        "class": OBSERVABILITY["class"],
        "config": {
            **OBSERVABILITY["config"],
            "prometheus_enabled": True,
            "prometheus_port": prometheus_port,
        },
    }
    bad_frames = [
        b"OTLP{not json",
        b"LOGS[1, 2]",
        b'MTRC{"resourceMetrics": 5}',
        b'LOGS{"resourceLogs": [[1]]}',
        b'OTLP{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 7}]}]}]}',
    ]
    count = 40
    async with running_engine(tmp_path, {"modules": [observability]}) as engine:
        await still_serves(engine)
        before = len(engine.log_text())
        for path in ("/", "/otel"):
            async with raw_worker(engine.port, path) as worker:
                for i in range(count):
                    await worker.send(bad_frames[i % len(bad_frames)])
                if path == "/":
                    await worker.send({"type": "ping"})
                    assert (await worker.receive_type("pong", timeout=10)) == {"type": "pong"}
        await still_serves(engine)
        text = engine.log_text()[before:]
        metrics = await http_get(prometheus_port, "/metrics")
    # Every dropped frame is counted, logged or not (one frame of five is readable).
    assert "iii_telemetry_frames_dropped_total 64.0" in metrics, metrics
    lines = text.splitlines()
    assert "Traceback" not in text, text[:4000]
    telemetry = [line for line in lines if "frame" in line]
    # Per connection: the first few, then one per interval (the test is far
    # shorter), and when it closes one line for those held back.
    assert len(telemetry) <= 2 * 6, "\n".join(telemetry)
    assert sum("were not logged" in line for line in lines) == 2, "\n".join(lines)
    assert len(lines) <= 40, "\n".join(lines)
    assert all(RECORD.match(line) for line in lines), "\n".join(lines)


def test_forged_record_pattern_matches_the_engine_format() -> None:
    """The test's idea of a record must match what the engine writes."""
    assert RECORD.match(FORGED_RECORD + "-x")
    assert not RECORD.match("  | " + FORGED_RECORD)


async def test_errors_about_a_huge_value_quote_only_a_snippet(tmp_path: Path) -> None:
    """The refusal a peer gets (and the log line about it) quotes a bounded piece of its value."""
    huge = "q" * (256 * 1024)  # under the 1 MiB frame cap of a worker that sends no features
    config = {
        "modules": [
            OBSERVABILITY,
            {"class": "modules::queue::QueueModule"},
            {"class": "modules::state::StateModule"},
            {
                "class": "modules::api::RestApiModule",
                "config": {"port": reserve_port(), "host": "127.0.0.1"},
            },
        ]
    }
    triggers = [
        ("queue", {"topic": "t", "concurrency": huge}),
        ("queue", {"topic": "t", "metadata": {"infrastructure": {"queue": {"type": [huge] * 4}}}}),
        ("log", {"level": huge}),
        ("http", {"api_path": "/x", "http_method": huge}),
    ]
    async with running_engine(tmp_path, config) as engine:
        before = len(engine.log_text())
        async with raw_worker(engine.port) as worker:
            for index, (trigger_type, trigger_config) in enumerate(triggers):
                await worker.send(
                    {
                        "type": "registertrigger",
                        "id": f"t{index}",
                        "trigger_type": trigger_type,
                        "function_id": "any::f",
                        "config": trigger_config,
                    }
                )
                refused = await worker.receive_type("triggerregistrationresult", timeout=20)
                message = refused["error"]["message"]
                assert "qqqq" in message and len(message) < 1024, (trigger_type, len(message))
            reply = await worker.call(
                "state::update", {"scope": "s", "key": "k", "ops": [{"type": huge}]}, timeout=20
            )
            message = reply["error"]["message"]
            assert "qqqq" in message and len(message) < 1024, len(message)
        await still_serves(engine)
        grown = len(engine.log_text()) - before
    assert grown < 64 * 1024, grown
