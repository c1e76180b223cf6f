"""Follow-up to issue 10 rows 7 and 9, replayed against a real engine process.

Each test runs ``python -m iii serve`` (:class:`tests.support.EngineProcess`)
with its default limits, attacks it over real sockets with raw WebSocket
clients, and reads back what the engine keeps:

* the observability module's stores are bounded in bytes, not only in
  entries: a flood of big log bodies (``engine::log::*`` calls and SDK ``LOGS``
  frames), of big spans (``OTLP`` frames) and of big metric points (``MTRC``
  frames) leaves each store under its byte bound, with the newest entries
  still there and every entry under its own bound;
* invocations of thousands of distinct (unknown) function ids do not grow the
  per-function metrics without bound;
* a worker whose token forbids what it asks for, asking 1,000 times for each
  kind of thing, adds a bounded number of lines to the engine's log.

The store's size is measured from outside, as the JSON the engine returns for
all of its entries (``engine::logs::list`` page by page, ``engine::traces::list``,
``engine::metrics::list``): that is what the engine holds, whatever it counts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import wrap_client_stream

from iii.testing import RawWorker
from tests.support import EngineProcess, running_engine

MiB = 1024 * 1024
KiB = 1024

# The documented defaults (README, Security): the tests attack an engine that
# runs with them.
LOGS_MAX_BYTES = 16 * MiB
LOGS_MAX_ENTRY_BYTES = 64 * KiB
SPANS_MAX_BYTES = 16 * MiB
SPAN_MAX_BYTES = 64 * KiB
METRICS_MAX_BYTES = 16 * MiB
METRIC_POINT_MAX_BYTES = 4 * KiB
MAX_FUNCTION_SERIES = 2000


OBSERVABILITY = {
    "class": "modules::observability::OtelModule",
    "config": {"enabled": True, "exporter": "memory", "prometheus_enabled": False},
}

TOKEN_LIMITED = "limited-token-0123456789abcdef"
AUTH = {
    "tokens": [
        {
            "name": "limited",
            "env": "III_TEST_TOKEN_LIMITED",
            "register": ["mine::*"],
            "invoke": ["mine::*"],
            "trigger_types": ["hook"],
        }
    ]
}


@pytest.fixture(autouse=True)
def _info_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_LOG_LEVEL", "info")
    monkeypatch.setenv("III_TEST_TOKEN_LIMITED", TOKEN_LIMITED)


@asynccontextmanager
async def raw_worker(
    port: int, path: str = "/", token: str | None = None
) -> AsyncIterator[RawWorker]:
    """A raw worker (big frames both ways) on a socket this helper owns and always closes."""
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            "127.0.0.1",
            path,
            extra_headers=headers,
            message_queue_size=64,
            max_message_size=64 * MiB,
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


async def big_answers(worker: RawWorker) -> None:
    """Tell the engine this worker takes frames over 1 MiB (as the SDKs do)."""
    reply = await worker.call(
        "engine::workers::register", {"name": "attacker", "features": ["large-messages.v1"]}
    )
    assert "error" not in reply, reply


async def ok(worker: RawWorker, function_id: str, data: Any = None, timeout: float = 30) -> Any:
    reply = await worker.call(function_id, {} if data is None else data, timeout=timeout)
    assert "error" not in reply, reply
    return reply.get("result")


async def wait_for_log(engine: EngineProcess, predicate: Any, timeout: float = 20) -> str:
    with trio.fail_after(timeout):
        while True:
            text = engine.log_text()
            if predicate(text):
                return text
            await trio.sleep(0.1)


async def still_serves(engine: EngineProcess, token: str | None = None) -> None:
    async with raw_worker(engine.port, token=token) as worker:
        await worker.send({"type": "ping"})
        assert (await worker.receive_type("pong", timeout=10)) == {"type": "pong"}


def json_size(value: Any) -> int:
    return len(orjson.dumps(value))


def otlp_string(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


# -- logs -------------------------------------------------------------------------------------


def logs_frame(tag: str, count: int, body_size: int) -> bytes:
    now = time.time_ns()
    records = [
        {
            "timeUnixNano": str(now + i),
            "severityNumber": 9,
            "severityText": "INFO",
            "body": {"stringValue": f"{tag}-{i}-" + "y" * body_size},
            "attributes": [otlp_string("blob", "a" * body_size)],
        }
        for i in range(count)
    ]
    payload = {
        "resourceLogs": [
            {
                "resource": {"attributes": [otlp_string("service.name", "sdk-" + "r" * body_size)]},
                "scopeLogs": [{"scope": {"name": "flood"}, "logRecords": records}],
            }
        ]
    }
    return b"LOGS" + orjson.dumps(payload)


async def all_logs(worker: RawWorker) -> list[dict[str, Any]]:
    """Every stored log, newest first, a few per page (each page is one frame)."""
    logs: list[dict[str, Any]] = []
    while True:
        page = await ok(worker, "engine::logs::list", {"offset": len(logs), "limit": 8})
        logs.extend(page["logs"])
        if not page["logs"] or len(logs) >= page["total"]:
            return logs


async def test_a_flood_of_big_logs_keeps_the_log_store_under_its_byte_bound(
    tmp_path: Path,
) -> None:
    flood = 320  # entries of ~60 KiB: more than the store's byte bound holds
    async with running_engine(tmp_path, {"modules": [OBSERVABILITY]}) as engine:
        async with raw_worker(engine.port) as worker:
            await big_answers(worker)
            answers = []
            for i in range(flood):
                data: dict[str, Any] = {"message": f"flood-{i:04d}-" + "x" * (60 * KiB)}
                if i % 80 == 0:
                    # Now and then a body (and data) far over one entry's bound ...
                    data = {"message": f"big-{i:04d}-" + "z" * (4 * MiB), "data": {"d": "d" * MiB}}
                    answers.append(await ok(worker, "engine::log::warn", data))
                    # ... and an SDK frame of big records.
                    await worker.send(logs_frame(f"frame-{i:04d}", 4, MiB))
                else:
                    await ok(worker, "engine::log::info", data)
            await ok(worker, "engine::log::info", {"message": "flood-last"})
            logs = await all_logs(worker)
            statistics = (await ok(worker, "engine::metrics::list"))["module_statistics"]
        await still_serves(engine)

    held = sum(json_size(entry) for entry in logs)
    assert held <= LOGS_MAX_BYTES, f"the log store holds {held} bytes of JSON"
    biggest = max(json_size(entry) for entry in logs)
    assert biggest <= LOGS_MAX_ENTRY_BYTES, f"one stored log is {biggest} bytes"
    bodies = [str(entry["body"]) for entry in logs]
    # The newest are there, the oldest were evicted.
    assert "flood-last" in bodies
    assert any(body.startswith(f"flood-{flood - 1:04d}-") for body in bodies)
    assert not any(body.startswith("flood-0001-") for body in bodies)
    assert len(logs) >= LOGS_MAX_BYTES // LOGS_MAX_ENTRY_BYTES
    # What the engine counts is what it holds, within its bound.
    assert 0 < statistics["observability"]["logs_bytes"] <= LOGS_MAX_BYTES
    # A body over the bound was cut, with a note, and the caller was told.
    cut = [entry for entry in logs if str(entry["body"]).startswith(f"big-{flood - 80:04d}-")]
    assert len(cut) == 1 and "more chars" in cut[0]["body"], [b[:80] for b in bodies[:5]]
    assert "iii.truncated" in cut[0]["attributes"]
    assert all(answer and answer["truncated"] is True for answer in answers), answers
    assert answers[0]["max_entry_bytes"] == LOGS_MAX_ENTRY_BYTES
    frames = [entry for entry in logs if str(entry["body"]).startswith("frame-")]
    assert frames and all(json_size(entry) <= LOGS_MAX_ENTRY_BYTES for entry in frames)


# -- spans ------------------------------------------------------------------------------------


def spans_frame(tag: str, first: int, count: int, blob_size: int) -> bytes:
    now = time.time_ns()
    spans = [
        {
            "traceId": f"{first + i + 1:032x}",
            "spanId": f"{first + i + 1:016x}",
            "name": f"{tag}-{first + i:04d}",
            "kind": 1,
            "startTimeUnixNano": str(now + i),
            "endTimeUnixNano": str(now + i + 1000),
            "attributes": [otlp_string("blob", "b" * blob_size)],
            "events": [
                {
                    "name": "e",
                    "timeUnixNano": str(now),
                    "attributes": [otlp_string("x", "e" * blob_size)],
                }
            ],
        }
        for i in range(count)
    ]
    payload = {
        "resourceSpans": [
            {
                "resource": {"attributes": [otlp_string("service.name", "sdk")]},
                "scopeSpans": [{"scope": {"name": "flood"}, "spans": spans}],
            }
        ]
    }
    return b"OTLP" + orjson.dumps(payload)


async def all_roots(worker: RawWorker) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    while True:
        page = await ok(worker, "engine::traces::list", {"offset": len(spans), "limit": 8})
        spans.extend(page["spans"])
        if not page["spans"] or len(spans) >= page["total"]:
            return spans


async def test_a_flood_of_big_spans_keeps_the_span_store_under_its_byte_bound(
    tmp_path: Path,
) -> None:
    async with running_engine(tmp_path, {"modules": [OBSERVABILITY]}) as engine:
        async with raw_worker(engine.port, "/otel") as otel:
            # 12 frames of 30 spans of ~60 KiB; now and then a frame of two
            # spans far over one span's bound.
            for frame in range(12):
                await otel.send(spans_frame("span", frame * 30, 30, 30 * KiB))
                if frame % 4 == 2:
                    await otel.send(spans_frame(f"huge-{frame:02d}", 1000 + frame * 2, 2, MiB))
        async with raw_worker(engine.port) as worker:
            await big_answers(worker)
            with trio.fail_after(30):
                while True:  # the /otel socket has no answers: wait for the last span
                    page = await ok(worker, "engine::traces::list", {"name": "span-0359"})
                    if page["total"]:
                        break
                    await trio.sleep(0.1)
            spans = await all_roots(worker)
            statistics = (await ok(worker, "engine::metrics::list"))["module_statistics"]
        await still_serves(engine)

    held = sum(json_size(span) for span in spans)
    assert held <= SPANS_MAX_BYTES, f"the span store holds {held} bytes of JSON"
    biggest = max(json_size(span) for span in spans)
    assert biggest <= SPAN_MAX_BYTES, f"one stored span is {biggest} bytes"
    names = {span["name"] for span in spans}
    assert "span-0359" in names and "span-0000" not in names
    assert len(spans) >= SPANS_MAX_BYTES // SPAN_MAX_BYTES
    assert 0 < statistics["observability"]["spans_bytes"] <= SPANS_MAX_BYTES
    # A span over the bound keeps what fits: its name, ids and times.
    big = [span for span in spans if span["name"] == "huge-10-1020"]
    assert len(big) == 1 and big[0]["trace_id"] == f"{1021:032x}", sorted(names)[:3]


# -- SDK metric points -------------------------------------------------------------------------


def metrics_frame(first: int, count: int, blob_size: int, unit_size: int = 1) -> bytes:
    now = time.time_ns()
    points = [
        {
            "timeUnixNano": str(now + i),
            "asInt": str(first + i),
            "attributes": [
                otlp_string("n", f"{first + i:05d}"),
                otlp_string("blob", "m" * blob_size),
            ],
        }
        for i in range(count)
    ]
    metric = {"name": "flood", "unit": "u" * unit_size, "sum": {"dataPoints": points}}
    payload = {
        "resourceMetrics": [
            {
                "resource": {"attributes": [otlp_string("service.name", "sdk")]},
                "scopeMetrics": [{"metrics": [metric]}],
            }
        ]
    }
    return b"MTRC" + orjson.dumps(payload)


async def test_a_flood_of_big_metric_points_keeps_their_store_under_its_byte_bound(
    tmp_path: Path,
) -> None:
    async with running_engine(tmp_path, {"modules": [OBSERVABILITY]}) as engine:
        async with raw_worker(engine.port, "/otel") as otel:
            # 5,000 points of ~3.3 KiB and, in the middle, points far over one point's bound.
            for frame in range(10):
                await otel.send(metrics_frame(frame * 500, 500, 3000))
                if frame == 4:
                    await otel.send(metrics_frame(100_000, 8, MiB, unit_size=MiB))
        async with raw_worker(engine.port) as worker:
            await big_answers(worker)
            with trio.fail_after(30):
                while True:
                    listed = await ok(worker, "engine::metrics::list", {"metric_name": "flood"})
                    points = listed["sdk_metrics"]
                    if any(point["value"] == 4999 for point in points):
                        break
                    await trio.sleep(0.1)
            statistics = listed["module_statistics"]
        await still_serves(engine)

    held = sum(json_size(point) for point in points)
    assert held <= METRICS_MAX_BYTES, f"the metric store holds {held} bytes of JSON"
    biggest = max(json_size(point) for point in points)
    assert biggest <= METRIC_POINT_MAX_BYTES, f"one stored point is {biggest} bytes"
    values = {point["value"] for point in points}
    assert 4999 in values and 100_007 in values and 0 not in values
    assert 0 < statistics["observability"]["sdk_metric_bytes"] <= METRICS_MAX_BYTES


# -- per-function metrics ----------------------------------------------------------------------


async def test_calls_to_many_unknown_functions_keep_per_function_metrics_bounded(
    tmp_path: Path,
) -> None:
    count = MAX_FUNCTION_SERIES + 500
    async with running_engine(tmp_path, {"modules": [OBSERVABILITY]}) as engine:
        async with raw_worker(engine.port) as worker:
            await big_answers(worker)
            for i in range(count):
                # Fire-and-forget: nobody waits for the function_not_found.
                await worker.send(
                    {
                        "type": "invokefunction",
                        "function_id": f"nope::{i:05d}::" + "f" * KiB,
                        "data": {},
                        "action": {"type": "void"},
                    }
                )
            with trio.fail_after(60):
                while True:
                    metrics = (await ok(worker, "engine::metrics::list"))["engine_metrics"]
                    if metrics["invocations"]["error"] >= count:
                        break
                    await trio.sleep(0.1)
        await still_serves(engine)
        text = engine.log_text()

    by_function = metrics["invocations"]["by_function"]
    assert len(by_function) <= MAX_FUNCTION_SERIES + 1, len(by_function)
    assert sum(by_function.values()) == metrics["invocations"]["total"]
    assert all(len(function_id) <= 1024 for function_id in by_function)
    # Each failed fire-and-forget call is not a log line of its own.
    assert text.count("nope::") < 100, text.count("nope::")


# -- refusals under auth.tokens ----------------------------------------------------------------


def forbidden(i: int) -> list[dict[str, Any]]:
    """One of each request the limited token may not make."""
    return [
        {"type": "registerfunction", "id": f"admin::f{i}"},
        {"type": "registertriggertype", "id": f"sneaky{i}", "description": "x"},
        {
            "type": "registertrigger",
            "id": f"t{i}",
            "trigger_type": "log",
            "function_id": "mine::f",
            "config": {},
        },
        {
            "type": "invokefunction",
            "function_id": f"admin::secret{i}",
            "data": {},
            "invocation_id": f"00000000-0000-4000-8000-{i:012d}",
        },
        {
            "type": "invokefunction",
            "function_id": f"admin::secret{i}",
            "data": {},
            "action": {"type": "void"},
        },
    ]


async def test_forbidden_requests_add_a_bounded_number_of_log_lines(tmp_path: Path) -> None:
    count = 1000
    config = {"modules": [OBSERVABILITY], "auth": AUTH}
    async with running_engine(tmp_path, config) as engine:
        await still_serves(engine, TOKEN_LIMITED)
        text = await wait_for_log(engine, lambda t: "disconnected" in t)
        before = len(text)
        async with raw_worker(engine.port, token=TOKEN_LIMITED) as worker:

            async def attack() -> None:
                for i in range(count):
                    for message in forbidden(i):
                        await worker.send(message)

            # Every refusal is still answered (read while sending: a worker
            # that does not read its answers is dropped as a slow consumer).
            answers = dict.fromkeys(
                ("registrationrejected", "invocationresult", "triggerregistrationresult"), 0
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                with trio.fail_after(60):
                    while min(answers.values()) < count:
                        kind = (await worker.receive(timeout=30))["type"]
                        answers[kind] = answers.get(kind, 0) + 1
        await still_serves(engine, TOKEN_LIMITED)
        # Both workers' disconnections are logged after the line for what was held back.
        text = await wait_for_log(engine, lambda t: t[before:].count("disconnected") >= 2)
        lines = text[before:].splitlines()

    refusal_lines = [line for line in lines if "refused" in line or "may not" in line]
    # The first few refusals, then at most one per interval (the test is shorter),
    # and at the close one line for those held back.
    assert len(refusal_lines) <= 10, "\n".join(refusal_lines)
    assert sum("were not logged" in line for line in lines) == 1, "\n".join(lines[-20:])
    assert len(lines) <= 40, "\n".join(lines[:60])
