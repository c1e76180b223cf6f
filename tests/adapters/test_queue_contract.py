"""The queue adapter contract, run directly against every backend.

The same cases on the builtin queue (in memory and on its file log), Redis
and RabbitMQ, through :func:`iii.adapters.queue.open_queue_adapter`, the way
``test_store_contract.py`` runs the stores: what :class:`QueueAdapter` and
:class:`QueueConsumer` promise (``iii/adapters/queue/__init__.py``), without
the module's retry counting, conditions or concurrency on top.  The module on
top of each backend is ``tests/modules/test_queue.py``; what one backend does
beyond the contract is in its own file (``test_builtin_queue.py``,
``test_redis_queue.py``, ``test_rabbitmq.py``).

Redis and RabbitMQ cases carry the ``services`` mark; they skip when the
service is absent, unless ``III_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from iii.adapters.queue import (
    Delivery,
    Job,
    QueueAdapter,
    QueueAdapterRef,
    QueueConsumer,
    open_queue_adapter,
)
from iii.config_schema import CONFIG_CONVERTER
from tests.modules.test_queue import delete_rabbit_topology, delete_redis_prefix
from tests.support import backend_params, require_rabbitmq, require_redis

KINDS = ("memory", "file", "redis", "rabbitmq")

# Values of every JSON kind, as a worker may enqueue them.
PAYLOADS: list[Any] = [
    None,
    0,
    -(2**53),
    1.5,
    "text with \u00e9 and \U0001f600",
    [1, [2, [3]], {"k": None}],
    {"nested": {"list": [True, False], "empty": {}}, "": "empty key"},
]


def _ref(kind: str, tmp_path: Path, prefix: str) -> QueueAdapterRef:
    """The adapter block of ``kind``, structured as the config loader does it."""
    if kind == "memory":
        block: dict[str, Any] = {"class": "embedded"}
    elif kind == "file":
        config = {"store_method": "file_based", "file_path": str(tmp_path / "queue")}
        block = {"class": "modules::queue::BuiltinQueueAdapter", "config": config}
    elif kind == "redis":
        config = {"redis_url": require_redis(), "key_prefix": prefix}
        block = {"class": "modules::queue::RedisAdapter", "config": config}
    else:
        config = {"amqp_url": require_rabbitmq()}
        block = {"class": "modules::queue::RabbitMQAdapter", "config": config}
    ref: QueueAdapterRef = CONFIG_CONVERTER.structure(block, QueueAdapterRef)
    return ref


@attrs.define
class Backend:
    """One backend's adapter, and how to open it again (a restart)."""

    kind: str
    adapter: QueueAdapter
    reopen: Any  # () -> async context manager of a new QueueAdapter on the same store
    queues: list[str]

    def queue(self) -> str:
        name = f"contract{uuid.uuid4().hex[:10]}"
        self.queues.append(name)
        return name


@pytest.fixture(params=backend_params(*KINDS))
async def backend(request: Any, tmp_path: Path) -> AsyncIterator[Backend]:
    kind = str(request.param)
    prefix = f"iiitest:{uuid.uuid4().hex[:8]}:"
    ref = _ref(kind, tmp_path, prefix)
    queues: list[str] = []
    try:
        with trio.fail_after(60):
            async with open_queue_adapter(ref) as adapter:
                yield Backend(kind, adapter, lambda: open_queue_adapter(ref), queues)
    finally:
        if kind == "redis":
            await delete_redis_prefix(prefix)
        elif kind == "rabbitmq" and queues:
            await delete_rabbit_topology(queues)


async def _receive(consumer: QueueConsumer, within: float = 20) -> Delivery:
    """The next delivery; ``receive`` answers ``None`` after a second, so ask again."""
    with trio.fail_after(within):
        while True:
            delivery = await consumer.receive(1)
            if delivery is not None:
                return delivery


async def _stats(adapter: QueueAdapter, queue: str) -> tuple[int, int, int, int]:
    stats = await adapter.stats(queue)
    assert stats.queue == queue
    return stats.waiting, stats.delayed, stats.active, stats.dlq


@asynccontextmanager
async def _consumer(
    adapter: QueueAdapter, queue: str, prefetch: int = 1
) -> AsyncIterator[QueueConsumer]:
    async with adapter.open_consumer(queue, f"c-{uuid.uuid4().hex[:6]}", prefetch) as consumer:
        yield consumer


def _job(queue: str, data: Any, **fields: Any) -> Job:
    return Job(id=str(uuid.uuid4()), queue=queue, data=data, created_at=1_700_000_000_000, **fields)


async def test_a_job_comes_back_as_it_was_enqueued_then_ack_removes_it(backend: Backend) -> None:
    adapter, queue = backend.adapter, backend.queue()
    job = _job(
        queue,
        {"n": 1},
        attempts_made=2,
        max_attempts=7,
        backoff_ms=321,
        function_id="f::target",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        baggage="k=v",
        grant="restricted",
    )
    await adapter.enqueue(job)
    assert queue in await adapter.list_queues()
    assert await _stats(adapter, queue) == (1, 0, 0, 0)
    async with _consumer(adapter, queue) as consumer:
        delivery = await _receive(consumer)
        assert delivery.job == job  # every field, through the backend's storage
        assert await _stats(adapter, queue) == (0, 0, 1, 0)
        await consumer.ack(delivery)
        assert await _stats(adapter, queue) == (0, 0, 0, 0)


async def test_every_json_value_round_trips(backend: Backend) -> None:
    adapter, queue = backend.adapter, backend.queue()
    jobs = [_job(queue, payload) for payload in PAYLOADS]
    for job in jobs:
        await adapter.enqueue(job)
    received: dict[str, Job] = {}
    async with _consumer(adapter, queue, prefetch=len(jobs)) as consumer:
        while len(received) < len(jobs):
            delivery = await _receive(consumer)
            assert delivery.job.id not in received, "delivered twice"
            received[delivery.job.id] = delivery.job
            await consumer.ack(delivery)
    for job in jobs:
        # repr: 0 and 0.0, 1 and True must not turn into each other
        assert repr(received[job.id].data) == repr(job.data)
        assert received[job.id] == job
    assert await _stats(adapter, queue) == (0, 0, 0, 0)


async def test_one_consumer_gets_jobs_in_enqueue_order(backend: Backend) -> None:
    adapter, queue = backend.adapter, backend.queue()
    for n in range(5):
        await adapter.enqueue(_job(queue, n))
    async with _consumer(adapter, queue) as consumer:
        order = []
        for _ in range(5):
            delivery = await _receive(consumer)
            order.append(delivery.job.data)
            await consumer.ack(delivery)
    assert order == [0, 1, 2, 3, 4]


async def test_queues_are_separate(backend: Backend) -> None:
    adapter = backend.adapter
    first, second = backend.queue(), backend.queue()
    await adapter.enqueue(_job(first, "for first"))
    await adapter.enqueue(_job(second, "for second"))
    async with _consumer(adapter, second) as consumer:
        delivery = await _receive(consumer)
        assert (delivery.job.queue, delivery.job.data) == (second, "for second")
        await consumer.ack(delivery)
    assert await _stats(adapter, first) == (1, 0, 0, 0)
    assert await _stats(adapter, second) == (0, 0, 0, 0)
    assert {first, second} <= set(await adapter.list_queues())


async def test_release_gives_the_job_back_unchanged(backend: Backend) -> None:
    adapter, queue = backend.adapter, backend.queue()
    job = _job(queue, {"n": 1}, attempts_made=1)
    await adapter.enqueue(job)
    async with _consumer(adapter, queue) as consumer:
        delivery = await _receive(consumer)
        await consumer.release(delivery)
        again = await _receive(consumer)
        assert again.job == job  # attempts unchanged
        await consumer.ack(again)
    assert await _stats(adapter, queue) == (0, 0, 0, 0)


async def test_retry_replaces_the_job_and_delivers_it_after_the_delay(backend: Backend) -> None:
    adapter, queue = backend.adapter, backend.queue()
    job = _job(queue, {"n": 1})
    await adapter.enqueue(job)
    async with _consumer(adapter, queue) as consumer:
        delivery = await _receive(consumer)
        counted = attrs.evolve(delivery.job, attempts_made=1)
        await consumer.retry(delivery, counted, 0.05)
        again = await _receive(consumer)
        assert again.job == counted  # the replacement, not the original
        await consumer.ack(again)
    assert await _stats(adapter, queue) == (0, 0, 0, 0)


async def test_dead_letter_then_redrive_one_and_discard_one(backend: Backend) -> None:
    adapter, queue = backend.adapter, backend.queue()
    kept, dropped = _job(queue, "kept"), _job(queue, "dropped")
    await adapter.enqueue(kept)
    await adapter.enqueue(dropped)
    async with _consumer(adapter, queue) as consumer:
        for _ in range(2):
            delivery = await _receive(consumer)
            failed = attrs.evolve(delivery.job, attempts_made=3)
            await consumer.dead_letter(delivery, failed, f"failed: {delivery.job.data}")
    assert await _stats(adapter, queue) == (0, 0, 0, 2)
    letters, total = await adapter.dlq_messages(queue, 0, 10)
    assert total == 2
    assert sorted(
        (letter.job.id, letter.job.attempts_made, letter.error) for letter in letters
    ) == sorted([(kept.id, 3, "failed: kept"), (dropped.id, 3, "failed: dropped")])
    assert all(letter.failed_at > 0 for letter in letters)
    page, total = await adapter.dlq_messages(queue, 1, 10)
    assert total == 2 and len(page) == 1

    assert await adapter.discard_message(queue, dropped.id) is True
    assert await adapter.discard_message(queue, dropped.id) is False
    assert await adapter.redrive_message(queue, str(uuid.uuid4())) is False
    assert await adapter.redrive_message(queue, kept.id) is True
    assert await _stats(adapter, queue) == (1, 0, 0, 0)
    async with _consumer(adapter, queue) as consumer:
        delivery = await _receive(consumer)
        assert delivery.job.id == kept.id and delivery.job.data == "kept"
        assert delivery.job.attempts_made == 0  # a redriven job starts over
        await consumer.ack(delivery)
    assert await adapter.dlq_messages(queue, 0, 10) == ([], 0)


async def test_redrive_moves_the_whole_dlq(backend: Backend) -> None:
    adapter, queue = backend.adapter, backend.queue()
    jobs = [_job(queue, n) for n in range(3)]
    for job in jobs:
        await adapter.enqueue(job)
    async with _consumer(adapter, queue) as consumer:
        for _ in jobs:
            delivery = await _receive(consumer)
            await consumer.dead_letter(delivery, delivery.job, "no")
    assert await adapter.redrive(queue) == 3
    assert await adapter.redrive(queue) == 0
    assert await _stats(adapter, queue) == (3, 0, 0, 0)
    async with _consumer(adapter, queue, prefetch=3) as consumer:
        seen = set()
        for _ in jobs:
            delivery = await _receive(consumer)
            seen.add(delivery.job.id)
            await consumer.ack(delivery)
    assert seen == {job.id for job in jobs}


async def test_an_enqueued_job_is_durable_across_a_reopen(backend: Backend) -> None:
    queue = backend.queue()
    job = _job(queue, {"durable": True})
    async with backend.reopen() as first:
        await first.enqueue(job)
    async with backend.reopen() as second:
        if backend.kind == "memory":
            # in memory, by design: each adapter is its own store
            assert await _stats(second, queue) == (0, 0, 0, 0)
            return
        async with _consumer(second, queue) as consumer:
            delivery = await _receive(consumer)
            assert delivery.job == job
            await consumer.ack(delivery)
        assert await _stats(second, queue) == (0, 0, 0, 0)
