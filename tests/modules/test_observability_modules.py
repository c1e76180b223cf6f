"""Observability across modules: the trace context of results, queue job and
cron firing spans, and the queue's numbers in ``/metrics`` and ``engine::metrics::list``.

Raw protocol workers over memory streams, the memory span exporter, and the
Prometheus text parser of ``prometheus_client`` for ``/metrics``.
"""

from __future__ import annotations

from typing import Any

import trio

from iii.testing import RawWorker, connect_test_worker, make_config, open_test_engine
from tests.modules.test_observability import serve_calls

OTEL = "modules::observability::OtelModule"
QUEUE = "modules::queue::QueueModule"
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


def otel_entry(**keys: Any) -> dict[str, Any]:
    return {
        "class": OTEL,
        "config": {"enabled": True, "exporter": "memory", "prometheus_port": 0, **keys},
    }


def queue_entry() -> dict[str, Any]:
    return {"class": QUEUE, "config": {"adapter": {"class": "modules::queue::BuiltinQueueAdapter"}}}


async def ok(worker: RawWorker, function_id: str, data: Any = None, **extra: Any) -> Any:
    answer = await worker.call(function_id, {} if data is None else data, **extra)
    assert "error" not in answer, answer
    return answer.get("result")


def span_ids(traceparent: str) -> tuple[str, str]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


# -- the result carries the engine span's context (protocol.md §3.9) ----------------------


async def test_result_carries_the_engine_span_context() -> None:
    config = make_config(modules=[otel_entry(), queue_entry()])
    async with open_test_engine(config) as engine:

        async def native(data: Any, ctx: Any) -> Any:
            return {"seen": ctx.traceparent}

        engine.register_function("obs::native", native)
        async with connect_test_worker(engine) as caller, connect_test_worker(engine) as target:
            await target.send({"type": "registerfunction", "id": "obs::remote"})
            await ok(target, "engine::functions::list")
            seen: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, target, seen)
                answer = await caller.call(
                    "obs::remote", {}, traceparent=TRACEPARENT, baggage="tenant=acme"
                )
                failed = await caller.call("obs::remote", {"fail": True}, traceparent=TRACEPARENT)
                nursery.cancel_scope.cancel()
            # Success: the result's context is the span the target ran under.
            assert answer["traceparent"] == seen[0]["traceparent"]
            trace_id, span_id = span_ids(answer["traceparent"])
            assert trace_id == TRACE and span_id != PARENT
            assert answer["baggage"] == "tenant=acme"
            # An error answer carries it too.
            assert failed["error"]["code"] == "boom"
            assert failed["traceparent"] == seen[1]["traceparent"]

            # An engine-side function: the context it ran under.
            native_answer = await caller.call("obs::native", {}, traceparent=TRACEPARENT)
            assert native_answer["traceparent"] == native_answer["result"]["seen"]
            assert span_ids(native_answer["traceparent"])[0] == TRACE

            # An enqueue action: the span of its engine::queue::enqueue call, in the caller's trace.
            enqueued = await caller.call(
                "obs::remote",
                {},
                traceparent=TRACEPARENT,
                action={"type": "enqueue", "queue": "later"},
            )
            assert "messageReceiptId" in enqueued["result"], enqueued
            trace_id, span_id = span_ids(enqueued["traceparent"])
            assert trace_id == TRACE and span_id != PARENT
            tree = await ok(caller, "engine::traces::tree", {"trace_id": TRACE})
            by_id = {span["span_id"]: span for span in tree["roots"]}
            assert by_id[span_id]["name"] == "call engine::queue::enqueue"
            assert by_id[span_id]["parent_span_id"] == PARENT


async def test_result_echoes_the_callers_context_without_a_tracer() -> None:
    async with open_test_engine(make_config(modules=[])) as engine:

        async def native(data: Any, ctx: Any) -> Any:
            return {"seen": ctx.traceparent}

        engine.register_function("obs::native", native)
        async with connect_test_worker(engine) as caller:
            answer = await caller.call("obs::native", {}, traceparent=TRACEPARENT, baggage="a=1")
            assert answer["result"] == {"seen": TRACEPARENT}
            assert answer["traceparent"] == TRACEPARENT and answer["baggage"] == "a=1"
            missing = await caller.call("obs::absent", {}, traceparent=TRACEPARENT)
            assert missing["error"]["code"] == "function_not_found"
            assert missing["traceparent"] == TRACEPARENT
            plain = await caller.call("obs::native", {})
            assert "traceparent" not in plain and "baggage" not in plain
