"""The observability module's handler for the engine's own log records, its intake,
and ``log`` triggers whose functions log.

What it stores is also what ``log`` triggers receive and what the OTLP log
exporter sends, so its bound is checked here, at the one place records enter.
The handler only enqueues (any thread); the module stores from its own task.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any

import orjson
import trio

from iii.causation import MAX_TRIGGER_DEPTH
from iii.log import MAX_MESSAGE_CHARS
from iii.modules.observability.log_intake import LogIntake, entry_size
from iii.modules.observability.logs import EngineLogHandler, LogStore
from iii.registry import TriggerRegistration
from iii.testing import connect_test_worker, make_config, open_test_engine


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


# -- the intake: the handler only enqueues ---------------------------------------------------

OTEL = "modules::observability::OtelModule"


def otel_config(**keys: Any) -> Any:
    config = {"enabled": True, "exporter": "memory", "prometheus_enabled": False, **keys}
    return make_config(modules=[{"class": OTEL, "config": config}])


def bodies(module: Any, prefix: str) -> list[str]:
    return [e["body"] for e in module.logs.entries() if str(e["body"]).startswith(prefix)]


def test_intake_is_bounded_in_bytes_and_counts_what_it_drops() -> None:
    intake = LogIntake(8 * 1024)
    entry = {"body": "x" * 1000, "attributes": {"logger": "iii.test"}}
    size = entry_size(entry)
    accepted = sum(intake.put(entry, 0) for _ in range(100))
    assert accepted == 8 * 1024 // size and intake.dropped == 100 - accepted
    assert intake.bytes == accepted * size <= intake.max_bytes
    assert len(intake.take()) == accepted and intake.bytes == 0
    assert intake.put(entry, 3)  # room again once taken
    (pending,) = intake.take()
    assert pending.depth == 3 and pending.entry is entry


def test_intake_gives_the_oldest_first_a_batch_at_a_time() -> None:
    intake = LogIntake(1 << 20)
    for n in range(10):
        intake.put({"body": f"b{n}"}, n)
    first = intake.take(4)
    assert [p.depth for p in first] == [0, 1, 2, 3]
    assert intake.bytes == sum(entry_size({"body": f"b{n}"}) for n in range(4, 10))
    assert [p.depth for p in intake.take()] == list(range(4, 10)) and intake.bytes == 0


async def test_records_from_several_threads_are_all_stored_each_in_order() -> None:
    async with open_test_engine(otel_config(logs_max_count=10_000)) as engine:
        module = engine.modules["observability"]
        logger = logging.getLogger("iii.test.threads")

        def write(thread: int) -> None:
            for n in range(300):
                logger.warning("thread-%d-%d", thread, n)

        # trio's worker threads, and plain threads trio knows nothing about.
        plain = [threading.Thread(target=write, args=(t,)) for t in (4, 5)]
        for thread in plain:
            thread.start()
        async with trio.open_nursery() as nursery:
            for t in range(4):
                nursery.start_soon(partial(trio.to_thread.run_sync, write, t))
            for thread in plain:
                nursery.start_soon(trio.to_thread.run_sync, thread.join)
        await engine.invoke("engine::logs::list", {"limit": 1})  # drains the intake first
        seen: dict[int, list[int]] = {}
        for body in bodies(module, "thread-"):
            _, thread_no, n = body.split("-")
            seen.setdefault(int(thread_no), []).append(int(n))
        assert seen == {t: list(range(300)) for t in range(6)}
        assert module.intake.dropped == 0 and module.intake.bytes == 0


async def test_nothing_is_lost_or_reordered_under_normal_load() -> None:
    async with open_test_engine(otel_config(logs_max_count=10_000)) as engine:
        module = engine.modules["observability"]
        logger = logging.getLogger("iii.test.order")
        for n in range(1000):
            logger.warning("order-%d", n)
            if n % 7 == 0:
                await trio.lowlevel.checkpoint()  # the drain task runs in between
        listed = await engine.invoke("engine::logs::list", {"limit": 5000})
        assert len([e for e in listed["logs"] if e["body"].startswith("order-")]) == 1000
        assert bodies(module, "order-") == [f"order-{n}" for n in range(1000)]
        assert module.statistics()["engine_records_dropped"] == 0


async def test_a_flood_of_records_holds_a_bounded_number_of_bytes() -> None:
    limit = 64 * 1024
    async with open_test_engine(otel_config(logs_max_bytes=limit)) as engine:
        module = engine.modules["observability"]
        logger = logging.getLogger("iii.test.flood")
        # No checkpoint in the loop: the drain task cannot run, the intake fills.
        for n in range(5000):
            logger.warning("flood-%d %s", n, "y" * 1000)
            assert module.intake.bytes <= limit
        dropped = module.intake.dropped
        assert dropped > 4000 and module.intake.peak_bytes <= limit
        assert module.statistics()["engine_records_dropped"] == dropped
        await engine.invoke("engine::logs::list", {"limit": 1})
        assert module.intake.bytes == 0 and module.logs.bytes <= limit
        # What was kept is the beginning of the flood, in order.
        kept = bodies(module, "flood-")
        assert kept and kept == sorted(kept, key=lambda b: int(b.split()[0][6:]))


async def test_shutdown_stores_what_is_still_queued() -> None:
    with trio.CancelScope() as stop:
        async with open_test_engine(otel_config(logs_max_count=10_000)) as engine:
            module = engine.modules["observability"]
            logger = logging.getLogger("iii.test.shutdown")
            for n in range(200):  # no checkpoint: still queued when the engine stops
                logger.warning("last-%d", n)
            assert len(module.intake) >= 200
            # Cancelled before the drain task runs again: only the module's exit stores them.
            stop.cancel()
    assert len(module.intake) == 0
    assert bodies(module, "last-") == [f"last-{n}" for n in range(200)]


# -- log triggers that log -------------------------------------------------------------------


def log_trigger(function_id: str, level: str = "warn") -> TriggerRegistration:
    return TriggerRegistration(
        worker_id=None,
        id=f"t-{function_id}",
        trigger_type="log",
        function_id=function_id,
        config={"level": level},
    )


async def wait_too_deep(module: Any) -> None:
    # A counter, polled: LoopWarning has no event to wait on.
    with trio.fail_after(20):
        while module.log_loops.skipped == 0:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_log_trigger_whose_function_logs_stops_at_the_causation_limit() -> None:
    async with open_test_engine(otel_config()) as engine:
        module = engine.modules["observability"]
        calls: list[str] = []

        async def on_log(data: Any, ctx: Any) -> None:
            if "start" in data["body"]:
                calls.append(data["body"])
                # An engine record, written by the trigger's own function.
                logging.getLogger("iii.test.loop").warning("handled %d start", len(calls))

        engine.register_function("loop::on_log", on_log)
        assert engine.register_trigger(log_trigger("loop::on_log")) is None
        logging.getLogger("iii.test.loop").warning("start")
        await wait_too_deep(module)
        # One call per depth 1..MAX_TRIGGER_DEPTH, then the chain is cut.
        assert len(calls) == MAX_TRIGGER_DEPTH
        assert module.statistics()["log_triggers_too_deep"] >= 1
        assert any("not run" in body for body in bodies(module, "log triggers"))


async def test_a_worker_log_trigger_that_logs_back_stops_at_the_causation_limit() -> None:
    async with open_test_engine(otel_config()) as engine:
        module = engine.modules["observability"]
        async with connect_test_worker(engine) as caller, connect_test_worker(engine) as handler:
            await handler.send({"type": "registerfunction", "id": "wloop::on_log"})
            await handler.send(
                {
                    "type": "registertrigger",
                    "id": "t1",
                    "trigger_type": "log",
                    "function_id": "wloop::on_log",
                    "config": {"level": "warn"},
                }
            )
            await handler.call("engine::functions::list", {})
            calls: list[str] = []

            async def serve() -> None:
                while True:
                    message = await handler.receive_type("invokefunction", timeout=30)
                    body = message["data"]["body"]
                    if "start" in body:
                        calls.append(body)
                        traceparent = message.get("traceparent")
                        if len(calls) % 2:  # a call, in the invocation's trace context
                            await handler.call(
                                "engine::log::warn",
                                {"message": f"w{len(calls)} start"},
                                traceparent=traceparent,
                            )
                        else:  # an SDK LOGS frame whose record carries the trace id
                            await handler.ws.send_message(
                                b"LOGS"
                                + orjson.dumps(otlp_log(f"w{len(calls)} start", traceparent))
                            )
                    await handler.send(
                        {
                            "type": "invocationresult",
                            "invocation_id": message["invocation_id"],
                            "function_id": message["function_id"],
                            "result": None,
                        }
                    )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                reply = await caller.call("engine::log::warn", {"message": "start"})
                assert "error" not in reply, reply
                await wait_too_deep(module)
                nursery.cancel_scope.cancel()
            assert len(calls) == MAX_TRIGGER_DEPTH


def otlp_log(body: str, traceparent: str | None) -> dict[str, Any]:
    assert traceparent is not None
    trace_id = traceparent.split("-")[1]
    record = {
        "body": {"stringValue": body},
        "severityNumber": 13,
        "severityText": "WARN",
        "traceId": trace_id,
    }
    return {"resourceLogs": [{"scopeLogs": [{"logRecords": [record]}]}]}
