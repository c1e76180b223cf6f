"""Observability across modules: the trace context of results, queue job and
cron firing spans, and the queue's numbers in ``/metrics`` and ``engine::metrics::list``.

Raw protocol workers over memory streams, the memory span exporter, and the
Prometheus text parser of ``prometheus_client`` for ``/metrics``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from iii.errors import IIIError
from iii.modules import cron
from iii.registry import TriggerRegistration
from iii.testing import RawWorker, connect_test_worker, make_config, open_test_engine
from tests.modules import test_queue
from tests.modules.test_cron import VirtualClock
from tests.modules.test_observability import http_get, serve_calls
from tests.modules.test_queue import adapter_block, topic_name

# The queue tests' backend fixture: memory, file, Redis, RabbitMQ (with their cleanup).
backend = test_queue.backend

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


def queue_entry(adapter: dict[str, Any] | None = None) -> dict[str, Any]:
    if adapter is None:
        config = {"backoff_ms": 50, "poll_interval_ms": 20}
        adapter = {"class": "modules::queue::BuiltinQueueAdapter", "config": config}
    return {"class": QUEUE, "config": {"adapter": adapter}}


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


# -- queue job spans ---------------------------------------------------------------------


async def wait_for_spans(
    worker: RawWorker, trace_id: str, name: str, count: int
) -> list[dict[str, Any]]:
    """The spans of the trace named ``name`` once there are ``count`` of them (ended)."""
    with trio.fail_after(10):
        while True:
            tree = await ok(worker, "engine::traces::tree", {"trace_id": trace_id})
            found = [span for span in walk(tree["roots"]) if span["name"] == name]
            if len(found) >= count:
                return found
            await trio.sleep(0.02)


def walk(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for span in spans:
        out.append(span)
        out.extend(walk(span.get("children") or []))
    return out


async def test_queue_job_span_sits_under_the_enqueuers_span(backend: str, tmp_path: Path) -> None:
    # The job's context travels through the backend (stored with the job).
    topic = topic_name("obs")
    config = make_config(modules=[otel_entry(), queue_entry(adapter_block(backend, tmp_path))])
    async with open_test_engine(config) as engine:
        async with connect_test_worker(engine) as caller, connect_test_worker(engine) as handler:
            await handler.send({"type": "registerfunction", "id": "obs::job"})
            await handler.send(
                {
                    "type": "registertrigger",
                    "id": "jobs",
                    "trigger_type": "queue",
                    "function_id": "obs::job",
                    "config": {
                        "topic": topic,
                        "metadata": {"infrastructure": {"queue": {"maxRetries": 1}}},
                    },
                }
            )
            await ok(handler, "engine::functions::list")
            seen: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, handler, seen)
                await ok(
                    caller,
                    "enqueue",
                    {"topic": topic, "data": {"n": 1}},
                    traceparent=TRACEPARENT,
                    baggage="tenant=acme",
                )
                (job_span,) = await wait_for_spans(caller, TRACE, f"queue {topic}", 1)
                nursery.cancel_scope.cancel()

            tree = await ok(caller, "engine::traces::tree", {"trace_id": TRACE})
            # The caller's span is not exported: its child, the enqueue call, is the root.
            (root,) = [span for span in tree["roots"] if span["name"] == "call enqueue"]
            assert root["parent_span_id"] == PARENT
            (child,) = root["children"]
            assert child["span_id"] == job_span["span_id"]
            assert child["status"] == "ok"
            attributes = dict(child["attributes"])
            assert attributes["iii.queue.topic"] == topic
            assert attributes["messaging.destination.name"] == topic
            assert attributes["function_id"] == "obs::job"
            assert attributes["iii.queue.attempt"] == 1
            assert attributes["iii.queue.outcome"] == "ack"
            # The function ran under the job span, and got its context and the baggage.
            (call,) = child["children"]
            assert call["name"] == "call obs::job"
            assert span_ids(seen[0]["traceparent"]) == (TRACE, call["span_id"])
            assert seen[0]["baggage"] == "tenant=acme"

            # A failing job: attempt 1 is retried, attempt 2 goes to the DLQ; both are spans.
            failing = "1" * 31 + "2"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, handler, seen)
                await ok(
                    caller,
                    "enqueue",
                    {"topic": topic, "data": {"fail": True}},
                    traceparent=f"00-{failing}-{PARENT}-01",
                )
                spans = await wait_for_spans(caller, failing, f"queue {topic}", 2)
                nursery.cancel_scope.cancel()
            by_attempt = {dict(s["attributes"])["iii.queue.attempt"]: s for s in spans}
            assert dict(by_attempt[1]["attributes"])["iii.queue.outcome"] == "retry"
            assert dict(by_attempt[2]["attributes"])["iii.queue.outcome"] == "dead_letter"
            for span in spans:
                assert span["status"] == "error"
                assert dict(span["attributes"])["iii.error.code"] == "boom"


async def test_function_queue_job_span_from_an_enqueue_action(backend: str, tmp_path: Path) -> None:
    queue = topic_name("obsq")
    config = make_config(modules=[otel_entry(), queue_entry(adapter_block(backend, tmp_path))])
    async with open_test_engine(config) as engine:
        async with connect_test_worker(engine) as caller, connect_test_worker(engine) as handler:
            await handler.send({"type": "registerfunction", "id": "obs::later"})
            await ok(handler, "engine::functions::list")
            seen: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, handler, seen)
                answer = await caller.call(
                    "obs::later",
                    {"x": 1},
                    traceparent=TRACEPARENT,
                    action={"type": "enqueue", "queue": queue},
                )
                assert "messageReceiptId" in answer["result"], answer
                (job_span,) = await wait_for_spans(caller, TRACE, f"queue {queue}", 1)
                nursery.cancel_scope.cancel()
            attributes = dict(job_span["attributes"])
            assert attributes["iii.queue.name"] == queue
            assert attributes["function_id"] == "obs::later"
            assert attributes["messaging.message.id"] == answer["result"]["messageReceiptId"]
            assert attributes["iii.queue.outcome"] == "ack"
            # The job carries the caller's context: the job span is the caller span's child.
            assert job_span["parent_span_id"] == PARENT
            assert [c["name"] for c in job_span["children"]] == ["call obs::later"]


# -- cron firing spans --------------------------------------------------------------------


async def test_cron_firing_spans(autojump_clock: Any) -> None:
    base = dt.datetime(2024, 1, 7, 0, 0, 5, tzinfo=dt.UTC)
    async with open_test_engine(make_config(modules=[otel_entry()])) as engine:
        contexts: list[str | None] = []

        async def tick(data: Any, ctx: Any) -> Any:
            contexts.append(ctx.traceparent)
            return None

        async def broken(data: Any, ctx: Any) -> Any:
            raise IIIError("no luck", code="tick_failed")

        async def never(data: Any, ctx: Any) -> Any:
            return False

        engine.register_function("obs::tick", tick)
        engine.register_function("obs::broken", broken)
        engine.register_function("obs::never", never)
        module = cron.Module(engine, cron.Config(), clock=VirtualClock(base))
        async with trio.open_nursery() as nursery:
            await nursery.start(module.run)
            for trigger_id, function_id, config in [
                ("every-10s", "obs::tick", {"expression": "*/10 * * * * *"}),
                ("broken", "obs::broken", {"expression": "*/10 * * * * *"}),
                (
                    "guarded",
                    "obs::tick",
                    {"expression": "0 * * * * *", "condition_function_id": "obs::never"},
                ),
            ]:
                refused = engine.register_trigger(
                    TriggerRegistration(
                        worker_id=None,
                        id=trigger_id,
                        trigger_type="cron",
                        function_id=function_id,
                        config=config,
                    )
                )
                assert refused is None
            await trio.sleep(21)  # :10 and :20 for the 10 s jobs; :00 of the next minute is later
            await trio.sleep(40)  # ... and :00 for the guarded one
            nursery.cancel_scope.cancel()

        listed = await engine.invoke("engine::traces::list", {"limit": 100})
        spans = [span for span in listed["spans"] if span["name"].startswith("cron ")]
        ticks = [s for s in spans if s["name"] == "cron obs::tick" and s["status"] == "ok"]
        by_time = {dict(s["attributes"])["iii.cron.scheduled_time"]: s for s in ticks}
        assert sorted(by_time) == [
            "2024-01-07T00:00:10+00:00",
            "2024-01-07T00:00:20+00:00",
            "2024-01-07T00:00:30+00:00",
            "2024-01-07T00:00:40+00:00",
            "2024-01-07T00:00:50+00:00",
            "2024-01-07T00:01:00+00:00",
        ]
        first = by_time["2024-01-07T00:00:10+00:00"]
        attributes = dict(first["attributes"])
        assert attributes["iii.cron.job_id"] == "every-10s"
        assert attributes["function_id"] == "obs::tick"
        assert attributes["faas.cron"] == "*/10 * * * * *"
        assert attributes["iii.cron.outcome"] == "ok"
        assert "parent_span_id" not in first or not first["parent_span_id"]
        # The function's call is the firing span's child, and the function saw its context.
        tree = await engine.invoke("engine::traces::tree", {"trace_id": first["trace_id"]})
        (root,) = tree["roots"]
        assert [child["name"] for child in root["children"]] == ["call obs::tick"]
        call = root["children"][0]
        assert (first["trace_id"], call["span_id"]) in [span_ids(c) for c in contexts if c]

        failed = [s for s in spans if s["name"] == "cron obs::broken"]
        assert len(failed) == 6
        assert all(s["status"] == "error" for s in failed)
        assert {dict(s["attributes"])["iii.cron.outcome"] for s in failed} == {"failed"}
        assert {dict(s["attributes"])["iii.error.code"] for s in failed} == {"tick_failed"}

        (guarded,) = [s for s in spans if dict(s["attributes"])["iii.cron.job_id"] == "guarded"]
        assert dict(guarded["attributes"])["iii.cron.outcome"] == "skipped"

        stats = module.statistics()
        assert (stats["fired_ok"], stats["fired_failed"], stats["skipped_by_condition"]) == (
            6,
            6,
            1,
        )
        assert stats["jobs"] == 3


# -- queue numbers in /metrics and engine::metrics::list ------------------------------------


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = await http_get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def test_queue_depth_in_prometheus_and_metrics_list(backend: str, tmp_path: Path) -> None:
    pending_topic, dead_topic = topic_name("obsp"), topic_name("obsd")
    config = make_config(modules=[otel_entry(), queue_entry(adapter_block(backend, tmp_path))])
    async with open_test_engine(config) as engine:

        async def fails(data: Any, ctx: Any) -> Any:
            raise IIIError("always", code="job_failed")

        engine.register_function("obs::fails", fails)
        refused = engine.register_trigger(
            TriggerRegistration(
                worker_id=None,
                id="dead",
                trigger_type="queue",
                function_id="obs::fails",
                config={
                    "topic": dead_topic,
                    "metadata": {"infrastructure": {"queue": {"maxRetries": 0}}},
                },
            )
        )
        assert refused is None
        port = engine.modules["observability"].prometheus_port
        async with connect_test_worker(engine) as worker:
            for n in range(3):  # no subscriber on this topic: the jobs wait
                await ok(worker, "enqueue", {"topic": pending_topic, "data": {"n": n}})
            await ok(worker, "enqueue", {"topic": dead_topic, "data": {}})
            with trio.fail_after(10):
                while True:
                    # Dead-lettered in the backend, and counted once the move returned.
                    stats = await ok(worker, "engine::queue::topic_stats", {"topic": dead_topic})
                    counted = engine.modules["queue"].statistics()["jobs_dead_lettered"]
                    if stats["dlq"] == 1 and counted == 1:
                        break
                    await trio.sleep(0.02)

            samples = await scrape(port)
            pending = (("kind", "topic"), ("topic", pending_topic))
            dead = (("kind", "topic"), ("topic", dead_topic))
            assert samples[("iii_module_queue_depth_waiting", pending)] == 3
            assert samples[("iii_module_queue_depth_dlq", pending)] == 0
            assert samples[("iii_module_queue_depth_waiting", dead)] == 0
            assert samples[("iii_module_queue_depth_dlq", dead)] == 1
            assert samples[("iii_module_queue_jobs_enqueued", ())] == 4
            assert samples[("iii_module_queue_jobs_dead_lettered", ())] == 1
            assert samples[("iii_module_queue_subscriptions", ())] == 1

            # A fourth job: the next scrape reads the depth again.
            await ok(worker, "enqueue", {"topic": pending_topic, "data": {"n": 3}})
            assert (await scrape(port))[("iii_module_queue_depth_waiting", pending)] == 4

            metrics = await ok(worker, "engine::metrics::list", {})
            queue = metrics["module_statistics"]["queue"]
            depth = {entry["topic"]: entry for entry in queue["depth"]}
            assert depth[pending_topic] == {
                "topic": pending_topic,
                "kind": "topic",
                "waiting": 4,
                "delayed": 0,
                "active": 0,
                "dlq": 0,
            }
            assert depth[dead_topic]["dlq"] == 1
            assert queue["jobs_enqueued"] == 5 and queue["jobs_dead_lettered"] == 1
            assert queue["depth_read_at"] is not None
