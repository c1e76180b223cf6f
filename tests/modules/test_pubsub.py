"""The pubsub module through raw workers, on the local and Redis adapters."""

from __future__ import annotations

import coredis
import pytest
import trio
import trio.testing

from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.backends import adapter_block, delete_prefix
from tests.support import backend_params


@pytest.fixture(params=backend_params("local", "redis"))
async def pubsub_engine(request, tmp_path):
    block = adapter_block("pubsub", "memory" if request.param == "local" else "redis", tmp_path)
    config = make_config([{"class": "modules::pubsub::PubSubModule", "config": {"adapter": block}}])
    try:
        async with open_test_engine(config) as engine:
            yield engine, block["config"].get("key_prefix")
    finally:
        if request.param == "redis":
            await delete_prefix(block["config"]["key_prefix"])


async def wait_redis_subscribers(prefix, topic, count):
    if prefix is None:
        return
    async with coredis.Redis.from_url("redis://127.0.0.1:6379") as client:
        with trio.fail_after(10):
            while (await client.pubsub_numsub(prefix + topic)).get(
                (prefix + topic).encode(), 0
            ) < count:
                await trio.sleep(0.02)


async def collect(worker, into):
    while True:
        message = await worker.receive_type("invokefunction", timeout=60)
        into.append((message["function_id"], message["data"]))
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": message["function_id"],
                "result": None,
            }
        )


async def test_every_subscriber_gets_every_message_and_unsubscribe_keeps_others(pubsub_engine):
    engine, prefix = pubsub_engine
    async with (
        connect_test_worker(engine) as a,
        connect_test_worker(engine) as b,
        connect_test_worker(engine) as caller,
    ):
        await a.send({"type": "registerfunction", "id": "a::handler"})
        await b.send({"type": "registerfunction", "id": "b::handler"})
        await a.send(
            {
                "type": "registertrigger",
                "id": "ta",
                "trigger_type": "subscribe",
                "function_id": "a::handler",
                "config": {"topic": "news"},
            }
        )
        await b.send(
            {
                "type": "registertrigger",
                "id": "tb",
                "trigger_type": "subscribe",
                "function_id": "b::handler",
                "config": {"topic": "news"},
            }
        )
        with trio.fail_after(10):
            while len(engine.registry.triggers) < 2:
                await trio.sleep(0.01)
        await wait_redis_subscribers(prefix, "news", 1)
        seen_a: list = []
        seen_b: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, a, seen_a)
            nursery.start_soon(collect, b, seen_b)
            reply = await caller.call(
                "publish", {"topic": "news", "data": {"n": 1, "nested": [1, None]}}
            )
            assert "error" not in reply and "result" not in reply
            with trio.fail_after(10):
                while not (seen_a and seen_b):
                    await trio.sleep(0.01)
            assert seen_a == [("a::handler", {"n": 1, "nested": [1, None]})]
            assert seen_b == [("b::handler", {"n": 1, "nested": [1, None]})]

            await a.send({"type": "unregistertrigger", "id": "ta", "trigger_type": "subscribe"})
            with trio.fail_after(10):
                while len(engine.registry.triggers) > 1:
                    await trio.sleep(0.01)
            await caller.call("publish", {"topic": "news", "data": "second"})
            with trio.fail_after(10):
                while len(seen_b) < 2:
                    await trio.sleep(0.01)
            # "second" was handed to every subscriber of its topic at once, in one
            # step (PubSubModule._deliver), so a delivery to ``a`` would already be
            # queued; what is left runs in this process: once every task is blocked,
            # it would have reached ``a``'s collector.
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert seen_b[1] == ("b::handler", "second")
        assert len(seen_a) == 1


async def test_publish_errors_and_refused_trigger(pubsub_engine):
    engine, _ = pubsub_engine
    async with connect_test_worker(engine) as w:
        reply = await w.call("publish", {"topic": "", "data": 1})
        assert reply["error"]["code"] == "topic_not_set"
        reply = await w.call("publish", {"data": 1})
        assert reply["error"]["code"] == "topic_not_set"
        assert "error" not in await w.call("publish", {"topic": "nobody-listens", "data": 1})
        await w.send({"type": "registerfunction", "id": "w::h"})
        await w.send(
            {
                "type": "registertrigger",
                "id": "t1",
                "trigger_type": "subscribe",
                "function_id": "w::h",
                "config": {"topic": ""},
            }
        )
        result = await w.receive_type("triggerregistrationresult")
        assert result["id"] == "t1" and result["error"]["code"] == "trigger_registration_failed"


async def test_slow_subscribers_fill_a_bounded_queue_then_deliveries_are_dropped(
    monkeypatch, caplog
):
    """Publishers faster than subscribers: deliveries wait in a bounded queue
    (not one task each), the rest are dropped and reported, the engine serves on."""
    monkeypatch.setattr("iii.modules.pubsub.CONCURRENT_DELIVERIES", 2)
    monkeypatch.setattr("iii.modules.pubsub.QUEUED_DELIVERIES", 5)
    config = make_config([{"class": "modules::pubsub::PubSubModule", "config": {}}])
    async with open_test_engine(config) as engine:
        async with connect_test_worker(engine) as slow, connect_test_worker(engine) as caller:
            await slow.send({"type": "registerfunction", "id": "slow::handler"})
            await slow.send(
                {
                    "type": "registertrigger",
                    "id": "t",
                    "trigger_type": "subscribe",
                    "function_id": "slow::handler",
                    "config": {"topic": "flood"},
                }
            )
            with trio.fail_after(10):
                while not engine.registry.triggers:
                    await trio.sleep(0.01)
            for n in range(20):
                reply = await caller.call("publish", {"topic": "flood", "data": n})
                assert "error" not in reply
            module = engine.modules["pubsub"]
            # 2 deliveries wait on the (silent) subscriber, 5 are queued, 13 dropped.
            with trio.fail_after(10):
                while module.dropped < 13:
                    await trio.sleep(0.01)
            # Every publish has returned, and the local adapter delivers in the
            # publisher's task: nothing else can be dropped once all tasks wait.
            await trio.testing.wait_all_tasks_blocked()
            assert module.dropped == 13
            assert any("deliveries dropped" in r.getMessage() for r in caplog.records)
            first = [(await slow.receive_type("invokefunction"))["data"] for _ in range(2)]
            assert sorted(first) == [0, 1]
            assert "result" in await caller.call("engine::functions::list", {})  # still serving
