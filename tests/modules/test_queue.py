"""The queue module on every adapter: delivery, retries → DLQ → redrive, concurrency,
FIFO groups, the enqueue action, the inspection functions, and durability.

Jobs go to engine-side recorder functions here (fast and exact); the official
SDK workers drive the same paths end to end in test_queue_sdk.py.  Redis and
RabbitMQ cases skip when the service is absent (fail under III_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from iii.errors import IIIError
from iii.registry import TriggerRegistration
from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.support import backend_params, require_rabbitmq, require_redis

BACKENDS = ["memory", "file", "redis", "rabbitmq"]
# BACKENDS as parameters: Redis and RabbitMQ carry the ``services`` mark
BACKEND_PARAMS = backend_params(*BACKENDS)
REDIS_PREFIX = f"iiitest:{uuid.uuid4().hex[:8]}:"


async def delete_redis_prefix(prefix: str) -> None:
    import coredis

    async with coredis.Redis.from_url("redis://127.0.0.1:6379", decode_responses=True) as client:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(keys)


def adapter_block(backend: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "backoff_ms": 50,
        "poll_interval_ms": 20,
        "visibility_timeout_ms": 3000,
        **extra,
    }
    if backend == "memory":
        return {"class": "modules::queue::BuiltinQueueAdapter", "config": base}
    if backend == "file":
        return {
            "class": "modules::queue::BuiltinQueueAdapter",
            "config": {
                **base,
                "store_method": "file_based",
                "file_path": str(tmp_path / "queue-data"),
            },
        }
    if backend == "redis":
        return {
            "class": "modules::queue::RedisAdapter",
            "config": {**base, "redis_url": require_redis(), "key_prefix": REDIS_PREFIX},
        }
    return {
        "class": "modules::queue::RabbitMQAdapter",
        "config": {**base, "amqp_url": require_rabbitmq()},
    }


@asynccontextmanager
async def queue_engine(adapter: dict[str, Any], **config: Any) -> AsyncIterator[Any]:
    modules = [{"class": "modules::queue::QueueModule", "config": {"adapter": adapter, **config}}]
    async with open_test_engine(make_config(modules=modules)) as engine:
        yield engine


class Recorder:
    """An engine function that records calls; ``behaviour`` may raise or sleep."""

    def __init__(
        self, engine: Any, function_id: str, behaviour: Callable[[Any], Any] | None = None
    ):
        self.calls: list[Any] = []
        self.running = 0
        self.max_running = 0
        self.behaviour = behaviour
        self.changed = trio.Event()
        engine.register_function(function_id, self.handle)

    async def handle(self, data: Any, ctx: Any) -> Any:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.behaviour is not None:
                result = self.behaviour(data)
                if hasattr(result, "__await__"):
                    await result
            self.calls.append(data)
            return None
        finally:
            self.running -= 1
            self.changed.set()
            self.changed = trio.Event()

    async def wait_calls(self, count: int, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while len(self.calls) < count:
                await self.changed.wait()


async def overlapping(rec: Recorder, count: int) -> None:
    """Wait until ``count`` calls have run at once (so a test of a limit sees it reached)."""
    with trio.fail_after(15):
        while rec.max_running < count:
            await trio.sleep(0.01)


def subscribe(
    engine: Any, topic: str, function_id: str, trigger_id: str | None = None, **config: Any
) -> None:
    error = engine.register_trigger(
        TriggerRegistration(
            worker_id=None,
            id=trigger_id or f"t-{uuid.uuid4().hex[:6]}",
            trigger_type="queue",
            function_id=function_id,
            config={"topic": topic, **config},
        )
    )
    assert error is None, error


USED_NAMES: list[str] = []


def topic_name(prefix: str = "t") -> str:
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    USED_NAMES.append(name)
    return name


async def delete_rabbit_topology(queues: list[str]) -> None:
    from pamqp.commands import Exchange, Queue

    from iii.adapters.queue.amqp import open_amqp_connection

    async with open_amqp_connection(require_rabbitmq()) as connection:
        channel = await connection.channel()
        for queue in queues:
            doomed = [f"iii.{queue}.queue", f"iii.{queue}.dlq"] + [
                f"iii.{queue}.delay.{50 * 2**k}" for k in range(6)
            ]
            for name in doomed:
                await channel.rpc(Queue.Delete(queue=name))
            await channel.rpc(Exchange.Delete(exchange=f"iii.{queue}.exchange"))


@pytest.fixture(params=BACKEND_PARAMS)
async def backend(request: Any) -> AsyncIterator[str]:
    yield str(request.param)
    if request.param == "redis":
        await delete_redis_prefix(REDIS_PREFIX)
    if request.param == "rabbitmq":
        await delete_rabbit_topology([n for name in USED_NAMES for n in (name, "@" + name)])
    USED_NAMES.clear()


async def test_enqueue_reaches_trigger_with_data_as_published(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path)) as engine:
        rec = Recorder(engine, "t::handle")
        topic = topic_name()
        subscribe(engine, topic, "t::handle")
        payloads = [{"n": i, "nested": {"x": [1, 2]}} for i in range(5)] + ["text", 7, None]
        for payload in payloads:
            assert await engine.invoke("enqueue", {"topic": topic, "data": payload}) is None
        await rec.wait_calls(len(payloads))
        assert sorted(map(repr, rec.calls)) == sorted(map(repr, payloads))
        with pytest.raises(IIIError) as info:
            await engine.invoke("enqueue", {"topic": "", "data": 1})
        assert info.value.code == "topic_not_set"
        with pytest.raises(IIIError) as info:
            await engine.invoke("enqueue", {"data": 1})
        assert info.value.code == "deserialization_error"


async def test_jobs_wait_for_a_subscriber(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path)) as engine:
        topic = topic_name()
        for i in range(3):
            await engine.invoke("enqueue", {"topic": topic, "data": i})
        # Held by the backend (an enqueue answers once its job is durable), not dropped.
        stats = await engine.invoke("engine::queue::topic_stats", {"topic": topic})
        assert (stats["waiting"], stats["active"], stats["dlq"]) == (3, 0, 0), stats
        rec = Recorder(engine, "t::late")
        subscribe(engine, topic, "t::late")
        await rec.wait_calls(3)
        assert sorted(rec.calls) == [0, 1, 2]


async def test_retries_then_dlq_then_redrive(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path, max_attempts=3)) as engine:
        attempts: list[Any] = []
        healthy = False

        def flaky(data: Any) -> None:
            attempts.append(data)
            if not healthy:
                raise IIIError("boom", code="handler_failed")

        rec = Recorder(engine, "t::flaky", flaky)
        topic = topic_name()
        subscribe(engine, topic, "t::flaky")
        await engine.invoke("enqueue", {"topic": topic, "data": {"job": 1}})
        with trio.fail_after(15):
            while True:
                stats = await engine.invoke("engine::queue::topic_stats", {"topic": topic})
                if stats["dlq"] == 1:
                    break
                await trio.sleep(0.05)
        assert len(attempts) == 3  # max_attempts runs in total, then the DLQ
        assert stats == {"topic": topic, "waiting": 0, "delayed": 0, "active": 0, "dlq": 1}, stats
        listed = await engine.invoke("engine::queue::dlq_messages", {"topic": topic})
        assert listed["total"] == 1
        message = listed["messages"][0]
        assert message["data"] == {"job": 1} and message["attempts"] == 3
        assert "handler_failed" in message["error"] and "boom" in message["error"]
        dlq_topics = await engine.invoke("engine::queue::dlq_topics", {})
        assert {"topic": topic, "kind": "topic", "count": 1} in dlq_topics["topics"]

        healthy = True
        assert await engine.invoke("iii::queue::redrive", {"queue": topic}) == {
            "queue": topic,
            "redriven": 1,
        }
        await rec.wait_calls(1)
        assert rec.calls == [{"job": 1}]
        with trio.fail_after(10):
            while (await engine.invoke("engine::queue::topic_stats", {"topic": topic}))["dlq"]:
                await trio.sleep(0.05)


async def test_redrive_and_discard_single_messages(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path, max_attempts=1)) as engine:
        fail = True

        def handler(data: Any) -> None:
            if fail:
                raise IIIError("nope", code="failed")

        rec = Recorder(engine, "t::h", handler)
        topic = topic_name()
        subscribe(engine, topic, "t::h")
        for i in range(3):
            await engine.invoke("enqueue", {"topic": topic, "data": i})
        with trio.fail_after(15):
            while (await engine.invoke("engine::queue::dlq_messages", {"topic": topic}))[
                "total"
            ] < 3:
                await trio.sleep(0.05)
        listed = await engine.invoke("engine::queue::dlq_messages", {"topic": topic, "limit": 10})
        by_data = {m["data"]: m["id"] for m in listed["messages"]}
        fail = False
        result = await engine.invoke(
            "iii::queue::discard_message", {"queue": topic, "message_id": by_data[0]}
        )
        assert result == {"queue": topic, "message_id": by_data[0], "discarded": True}
        result = await engine.invoke(
            "iii::queue::redrive_message", {"queue": topic, "message_id": by_data[1]}
        )
        assert result["redriven"] is True
        await rec.wait_calls(1)
        assert rec.calls == [1]
        with pytest.raises(IIIError) as info:
            await engine.invoke(
                "iii::queue::redrive_message", {"queue": topic, "message_id": by_data[0]}
            )
        assert info.value.code == "message_not_found"
        remaining = await engine.invoke("engine::queue::dlq_messages", {"topic": topic})
        assert [m["data"] for m in remaining["messages"]] == [2]


async def test_per_trigger_concurrency(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path)) as engine:

        async def slow(data: Any) -> None:
            await overlapping(rec, 2)
            await trio.sleep(0.1)  # holds its slot: a third call now would overlap

        rec = Recorder(engine, "t::slow", slow)
        topic = topic_name()
        subscribe(engine, topic, "t::slow", concurrency=2)
        for i in range(8):
            await engine.invoke("enqueue", {"topic": topic, "data": i})
        await rec.wait_calls(8)
        assert rec.max_running == 2


async def test_fifo_groups_run_in_order_one_at_a_time(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path)) as engine:
        running: set[str] = set()
        overlaps: list[str] = []

        async def work(data: Any) -> None:
            if data["g"] in running:
                overlaps.append(data["g"])
            running.add(data["g"])
            await overlapping(rec, 2)
            await trio.sleep(0.02)
            running.discard(data["g"])

        rec = Recorder(engine, "t::fifo", work)
        topic = topic_name()
        subscribe(engine, topic, "t::fifo", concurrency=4, message_group_field="g")
        for i in range(6):
            for group in ("a", "b"):
                await engine.invoke("enqueue", {"topic": topic, "data": {"g": group, "i": i}})
        await rec.wait_calls(12)
        assert overlaps == []
        for group in ("a", "b"):
            assert [c["i"] for c in rec.calls if c["g"] == group] == list(range(6))
        assert rec.max_running == 2  # the two groups ran side by side


async def test_enqueue_action_from_a_worker(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path)) as engine:
        rec = Recorder(engine, "t::target")
        queue = topic_name("q")
        async with connect_test_worker(engine) as worker:
            reply = await worker.call(
                "t::target", {"v": 1}, action={"type": "enqueue", "queue": queue}, timeout=10
            )
            assert "error" not in reply, reply
            receipt = reply["result"]["messageReceiptId"]
            assert uuid.UUID(receipt)
        await rec.wait_calls(1)
        assert rec.calls == [{"v": 1}]  # as sent: no _caller_worker_id
        topics = await engine.invoke("engine::queue::list_topics", {})
        assert {"topic": queue, "kind": "queue"} in topics["topics"]


async def test_condition_false_skips(backend: str, tmp_path: Path) -> None:
    async with queue_engine(adapter_block(backend, tmp_path)) as engine:
        rec = Recorder(engine, "t::h")
        asked: list[Any] = []
        all_asked = trio.Event()

        async def condition(data: Any, ctx: Any) -> Any:
            asked.append(data)
            if len(asked) == 6:
                all_asked.set()
            return data % 2 == 0

        engine.register_function("t::even", condition)
        topic = topic_name()
        subscribe(engine, topic, "t::h", _condition_path="t::even")
        for i in range(6):
            await engine.invoke("enqueue", {"topic": topic, "data": i})
        await rec.wait_calls(3)
        with trio.fail_after(15):
            await all_asked.wait()
        # Every job's condition has answered; a handler call would follow in this
        # process, with no backend I/O in between: once every task is blocked,
        # any call the consumer was going to make has been made.
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(asked) == list(range(6))
        assert sorted(rec.calls) == [0, 2, 4]


@pytest.mark.parametrize("config", [{"topic": ""}, {"topic": "x", "concurrency": 0}, "nope"])
async def test_bad_trigger_config_is_refused(config: Any, tmp_path: Path) -> None:
    async with queue_engine(adapter_block("memory", tmp_path)) as engine:
        error = engine.register_trigger(
            TriggerRegistration(
                worker_id=None, id="bad", trigger_type="queue", function_id="f", config=config
            )
        )
        assert error is not None and error.code == "trigger_registration_failed"


async def test_file_store_keeps_jobs_across_restart(tmp_path: Path) -> None:
    adapter = adapter_block("file", tmp_path, max_attempts=5, backoff_ms=200)
    topic = topic_name()
    async with queue_engine(adapter) as engine:
        for i in range(20):
            await engine.invoke("enqueue", {"topic": topic, "data": i})

        def fail(data: Any) -> None:
            raise IIIError("later", code="failed")

        Recorder(engine, "t::fail", fail)
        subscribe(engine, topic, "t::fail", concurrency=1)
        with trio.fail_after(10):
            while (await engine.invoke("engine::queue::topic_stats", {"topic": topic}))[
                "delayed"
            ] == 0:
                await trio.sleep(0.02)
    async with queue_engine(adapter) as engine:
        stats = await engine.invoke("engine::queue::topic_stats", {"topic": topic})
        assert stats["waiting"] + stats["delayed"] == 20
        rec = Recorder(engine, "t::ok")
        subscribe(engine, topic, "t::ok")
        await rec.wait_calls(20)
        assert sorted(rec.calls) == list(range(20))
    async with queue_engine(adapter) as engine:
        stats = await engine.invoke("engine::queue::topic_stats", {"topic": topic})
        assert stats == {"topic": topic, "waiting": 0, "delayed": 0, "active": 0, "dlq": 0}


@pytest.mark.services
async def test_redis_keys_vanishing_does_not_crash_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend error inside a consumer is retried, not a module crash."""
    caplog.set_level(logging.WARNING, logger="iii.modules.queue.consumer")

    def consumer_failed() -> bool:
        return any(
            record.name == "iii.modules.queue.consumer" and " failed (" in record.getMessage()
            for record in caplog.records
        )

    async with queue_engine(adapter_block("redis", tmp_path)) as engine:
        rec = Recorder(engine, "t::h")
        topic = topic_name()
        subscribe(engine, topic, "t::h")
        await engine.invoke("enqueue", {"topic": topic, "data": 1})
        await rec.wait_calls(1)
        await delete_redis_prefix(
            REDIS_PREFIX
        )  # the stream and its group disappear under the consumer
        assert not consumer_failed()
        with trio.fail_after(20):  # the consumer meets it, and retries
            while not consumer_failed():
                await trio.sleep(0.02)
        await engine.invoke("enqueue", {"topic": topic, "data": 2})
        await rec.wait_calls(2, timeout=20)
    await delete_redis_prefix(REDIS_PREFIX)
