"""Two engines on one Redis (same key prefix): events cross between them."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.backends import redis_prefix
from tests.modules.test_pubsub import wait_redis_subscribers
from tests.modules.test_stream import client_of, event_of

pytestmark = pytest.mark.services


def engine_config(prefix: str):
    redis = {"redis_url": "redis://127.0.0.1:6379", "key_prefix": prefix}
    return make_config(
        [
            {
                "class": "modules::state::StateModule",
                "config": {
                    "adapter": {"class": "modules::state::adapters::RedisAdapter", "config": redis}
                },
            },
            {
                "class": "modules::stream::StreamModule",
                "config": {
                    "port": 0,
                    "host": "127.0.0.1",
                    "adapter": {
                        "class": "modules::stream::adapters::RedisAdapter",
                        "config": redis,
                    },
                },
            },
            {
                "class": "modules::pubsub::PubSubModule",
                "config": {"adapter": {"class": "modules::pubsub::RedisAdapter", "config": redis}},
            },
        ]
    )


async def answer(worker, seen):
    while True:
        message = await worker.receive_type("invokefunction", timeout=60)
        seen.append((message["function_id"], message["data"]))
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": message["function_id"],
                "result": None,
            }
        )


async def wait_for(predicate, timeout=10):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_events_cross_engines():
    async with redis_prefix() as prefix, AsyncExitStack() as stack:
        engine_a = await stack.enter_async_context(open_test_engine(engine_config(prefix)))
        engine_b = await stack.enter_async_context(open_test_engine(engine_config(prefix)))
        on_a = await stack.enter_async_context(connect_test_worker(engine_a))
        on_b = await stack.enter_async_context(connect_test_worker(engine_b))
        await on_a.send({"type": "registerfunction", "id": "a::news"})
        await on_b.send({"type": "registerfunction", "id": "b::news"})
        await on_b.send({"type": "registerfunction", "id": "b::state"})
        await on_a.send(
            {
                "type": "registertrigger",
                "id": "ta",
                "trigger_type": "subscribe",
                "function_id": "a::news",
                "config": {"topic": "news"},
            }
        )
        await on_b.send(
            {
                "type": "registertrigger",
                "id": "tb",
                "trigger_type": "subscribe",
                "function_id": "b::news",
                "config": {"topic": "news"},
            }
        )
        await on_b.send(
            {
                "type": "registertrigger",
                "id": "ts",
                "trigger_type": "state",
                "function_id": "b::state",
                "config": {"scope": "users"},
            }
        )
        await wait_for(
            lambda: len(engine_a.registry.triggers) == 1 and len(engine_b.registry.triggers) == 2
        )
        await wait_redis_subscribers(prefix, "news", 2)  # one SUBSCRIBE per engine

        seen_a: list = []
        seen_b: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, on_a, seen_a)
            nursery.start_soon(answer, on_b, seen_b)
            async with client_of(engine_b) as client_on_b:
                await client_on_b.join("s", "chat", "room")
                assert (await client_on_b.receive())["event"] == {"type": "sync", "data": []}

                # state::set through A fires the state trigger whose worker is on B
                async with connect_test_worker(engine_a) as caller_a:
                    reply = await caller_a.call(
                        "state::set", {"scope": "users", "key": "u1", "value": {"name": "x"}}
                    )
                    assert reply["result"] == {"old_value": None, "new_value": {"name": "x"}}
                    await wait_for(lambda: any(fid == "b::state" for fid, _ in seen_b))
                    event = next(d for fid, d in seen_b if fid == "b::state")
                    assert event == {
                        "type": "state",
                        "event_type": "state:created",
                        "scope": "users",
                        "key": "u1",
                        "old_value": None,
                        "new_value": {"name": "x"},
                    }

                    # a stream client on B gets the create event of a stream::set through A
                    reply = await caller_a.call(
                        "stream::set",
                        {
                            "stream_name": "chat",
                            "group_id": "room",
                            "item_id": "m1",
                            "data": {"t": "hi"},
                        },
                    )
                    assert "error" not in reply
                    assert event_of(await client_on_b.receive()) == (
                        "chat",
                        "room",
                        "m1",
                        {"type": "create", "data": {"t": "hi"}},
                    )

                    # publish on A reaches the subscribers on both engines, once each
                    assert "error" not in await caller_a.call(
                        "publish", {"topic": "news", "data": {"n": 1}}
                    )
                    # Sentinels: a second message and a second write.  Each engine reads
                    # Redis in order, so a duplicate of the first would have been read
                    # (and queued) before the sentinel; from there on, everything runs
                    # in this process, and is done once every task is blocked.
                    assert "error" not in await caller_a.call(
                        "publish", {"topic": "news", "data": {"n": 2}}
                    )
                    reply = await caller_a.call(
                        "state::set", {"scope": "users", "key": "u2", "value": 2}
                    )
                    assert "error" not in reply
                    await wait_for(
                        lambda: (
                            {"n": 2} in [d for fid, d in seen_a if fid == "a::news"]
                            and {"n": 2} in [d for fid, d in seen_b if fid == "b::news"]
                            and any(fid == "b::state" and d["key"] == "u2" for fid, d in seen_b)
                        )
                    )
                    await trio.testing.wait_all_tasks_blocked()
                    assert sorted(d["n"] for fid, d in seen_a if fid == "a::news") == [1, 2]
                    assert sorted(d["n"] for fid, d in seen_b if fid == "b::news") == [1, 2]
                    # fired once, not once per engine
                    assert sorted(d["key"] for fid, d in seen_b if fid == "b::state") == [
                        "u1",
                        "u2",
                    ]
                    # the writes are shared too
                    async with connect_test_worker(engine_b) as caller_b:
                        assert (await caller_b.call("state::get", {"scope": "users", "key": "u1"}))[
                            "result"
                        ] == {"name": "x"}
            nursery.cancel_scope.cancel()


@pytest.mark.sdk
async def test_two_engine_processes_with_an_sdk_worker(tmp_path):
    """Two real engine processes: an SDK worker on B gets the state event and the
    message that a client of A caused."""
    from tests.sdk_workers import sdk_worker
    from tests.support import EngineProcess

    async with redis_prefix() as prefix:
        redis = {"redis_url": "redis://127.0.0.1:6379", "key_prefix": prefix}
        modules = [
            {
                "class": "modules::state::StateModule",
                "config": {
                    "adapter": {"class": "modules::state::adapters::RedisAdapter", "config": redis}
                },
            },
            {
                "class": "modules::pubsub::PubSubModule",
                "config": {"adapter": {"class": "modules::pubsub::RedisAdapter", "config": redis}},
            },
        ]
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        engine_a = EngineProcess.write(tmp_path / "a", {"modules": modules})
        engine_b = EngineProcess.write(tmp_path / "b", {"modules": modules})
        engine_a.start()
        engine_b.start()
        try:
            await engine_a.started()
            await engine_b.started()
            async with (
                sdk_worker(
                    "0.25.0",
                    engine_b.url,
                    handlers={"b::on_state": None, "b::on_news": None},
                    triggers=[
                        ["state", "b::on_state", {"scope": "orders"}],
                        ["subscribe", "b::on_news", {"topic": "news"}],
                    ],
                ) as on_b,
                sdk_worker("0.4.1", engine_a.url) as on_a,
            ):
                await wait_redis_subscribers(prefix, "news", 1)
                assert await on_a.call(
                    "state::set", {"scope": "orders", "key": "o1", "value": {"qty": 2}}
                ) == {"old_value": None, "new_value": {"qty": 2}}
                assert await on_a.call("publish", {"topic": "news", "data": {"hello": "b"}}) is None
                [state_event] = await on_b.wait_events(1, "b::on_state")
                assert state_event["event_type"] == "state:created" and state_event[
                    "new_value"
                ] == {"qty": 2}
                assert await on_b.wait_events(1, "b::on_news") == [{"hello": "b"}]
        finally:
            engine_a.kill()
            engine_b.kill()
