"""The RabbitMQ queue backend (``modules::queue::RabbitMQAdapter``), on :mod:`.amqp`.

Topology per queue (upstream's names, all durable), declared once per
connection before first use::

    iii.<q>.exchange   topic exchange  --(routing key <q>)-->  iii.<q>.queue
    iii.<q>.dlq        dead letters, fed by explicit publishes (upstream's shape)
    iii.<q>.delay.<ms> retry delay: x-message-ttl = ms, dead-lettered back to
                       iii.<q>.exchange with key <q> (one queue per delay, so a
                       short delay never waits behind a long one)

Messages are persistent (delivery_mode 2) JSON jobs with upstream's headers
(``x-iii-job-id``, ``x-iii-attempts``, ``x-iii-max-attempts``,
``x-iii-created-at``; ``x-iii-attempts`` wins over the body on receipt).

* ``enqueue`` publishes with **publisher confirms** and returns once the
  broker confirmed (persisted) the message.
* Each consumer has its own channel with ``basic.qos(prefetch = the
  trigger's concurrency)`` and **manual acks**.  If the engine dies, the
  broker requeues every unacked message when the connection drops.
* ``retry`` publishes the job (attempts counted) to the delay queue for its
  backoff, confirmed, then acks the original; ``dead_letter`` publishes
  ``{job, error, failed_at}`` to the DLQ, confirmed, then acks.  A crash
  between the two delivers the job twice, never zero times.
* DLQ reads and redrives use ``basic.get`` on a short-lived channel; messages
  it leaves unacked are requeued when that channel closes.

Limits of AMQP without the management plugin: ``list_queues`` knows the
queues this engine touched since it started, and ``active`` counts the jobs
this engine holds.

Why this client: see :mod:`.amqp` (pamqp's codec over trio streams; no
maintained trio-native AMQP client exists, and a sync client in threads
fights cancellation and needs a thread owning every channel).

Config: ``amqp_url`` (``amqp://localhost:5672``), ``max_attempts``,
``prefetch_count`` (default concurrency, 10), ``queue_mode``
(``standard``/``fifo``), plus ``backoff_ms``, ``poll_interval_ms``,
``visibility_timeout_ms``.

Lifetime: :func:`open_adapter` owns a nursery holding the current
connection; a lost connection is replaced on the next operation (consumers
reopen through the module's retry loop).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
from pamqp.commands import Basic, Exchange, Queue

from iii.adapters.queue.amqp import AmqpChannel, AmqpConnection, AmqpMessage, open_amqp_connection
from iii.adapters.queue.base import (
    DeadLetter,
    Delivery,
    Job,
    QueueDefaults,
    QueueStats,
    RabbitQueueConfig,
)
from iii.errors import AdapterUnavailableError

__all__ = ["Config", "RabbitQueueAdapter", "open_adapter", "names"]

log = logging.getLogger(__name__)


# Declared in iii.adapters.queue.base (read without importing the AMQP client).
Config = RabbitQueueConfig


def names(queue: str) -> tuple[str, str, str]:
    """(exchange, queue, dlq) names for ``queue``."""
    return f"iii.{queue}.exchange", f"iii.{queue}.queue", f"iii.{queue}.dlq"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _properties(job: Job) -> Any:
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=job.id,
        headers={
            "x-iii-job-id": job.id,
            "x-iii-attempts": job.attempts_made,
            "x-iii-max-attempts": job.max_attempts,
            "x-iii-created-at": job.created_at,
        },
    )


@attrs.define(eq=False)
class RabbitQueueAdapter:
    defaults: QueueDefaults
    url: str
    _nursery: trio.Nursery | None = None
    _connection: AmqpConnection | None = None
    _publisher: AmqpChannel | None = None
    _admin: AmqpChannel | None = None
    _connect_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _declare_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _declared: set[str] = attrs.field(factory=set)
    _known: set[str] = attrs.field(factory=set)
    _delays: dict[str, set[int]] = attrs.field(factory=lambda: defaultdict(set))
    _active: dict[str, int] = attrs.field(factory=lambda: defaultdict(int))

    # -- connection ------------------------------------------------------------------------

    async def _keep_connection(self, task_status: trio.TaskStatus[AmqpConnection]) -> None:
        async with open_amqp_connection(self.url) as connection:
            task_status.started(connection)
            await connection.closed.wait()

    async def connection(self) -> AmqpConnection:
        async with self._connect_lock:
            if self._connection is None or self._connection.closed.is_set():
                assert self._nursery is not None
                self._declared.clear()
                self._admin = None
                self._connection = await self._nursery.start(self._keep_connection)
                self._publisher = await self._open_publisher(self._connection)
            return self._connection

    @staticmethod
    async def _open_publisher(connection: AmqpConnection) -> AmqpChannel:
        """A channel in confirm mode.  The caller stores it only once it is, so
        an open that is cancelled or fails halfway never leaves a publisher
        whose publishes would return without the broker's confirm."""
        channel = await connection.channel()
        try:
            await channel.confirm_select()
        except BaseException:
            with trio.CancelScope(shield=True):
                await channel.aclose()
            raise
        return channel

    async def _publisher_channel(self) -> AmqpChannel:
        await self.connection()
        async with self._connect_lock:
            if self._publisher is None or self._publisher.closed is not None:
                assert self._connection is not None
                self._publisher = await self._open_publisher(self._connection)
            return self._publisher

    async def _admin_channel(self) -> AmqpChannel:
        """The channel for declares and counts (the caller holds ``_declare_lock``).

        The broker closes a channel on a refused method (PRECONDITION_FAILED
        for a queue declared elsewhere with other arguments): the next call
        opens a new one, so one refusal fails one call only.
        """
        connection = await self.connection()
        if self._admin is None or self._admin.closed is not None:
            self._admin = await connection.channel()
        return self._admin

    async def declare(self, queue: str) -> None:
        await self.connection()
        if queue in self._declared:
            return
        async with self._declare_lock:
            if queue in self._declared:
                return
            admin = await self._admin_channel()
            exchange, main, dlq = names(queue)
            await admin.rpc(
                Exchange.Declare(exchange=exchange, exchange_type="topic", durable=True)
            )
            await admin.rpc(Queue.Declare(queue=main, durable=True))
            await admin.rpc(Queue.Bind(queue=main, exchange=exchange, routing_key=queue))
            await admin.rpc(Queue.Declare(queue=dlq, durable=True))
            self._declared.add(queue)
            self._known.add(queue)

    async def _declare_delay(self, queue: str, delay_ms: int) -> str:
        name = f"iii.{queue}.delay.{delay_ms}"
        key = f"{queue}\0delay\0{delay_ms}"
        if key in self._declared:
            return name
        async with self._declare_lock:
            admin = await self._admin_channel()
            await admin.rpc(
                Queue.Declare(
                    queue=name,
                    durable=True,
                    arguments={
                        "x-message-ttl": delay_ms,
                        "x-dead-letter-exchange": names(queue)[0],
                        "x-dead-letter-routing-key": queue,
                    },
                )
            )
            self._declared.add(key)
            self._delays[queue].add(delay_ms)
        return name

    async def _count(self, queue_name: str, arguments: dict[str, Any] | None = None) -> int:
        async with self._declare_lock:
            admin = await self._admin_channel()
            ok = await admin.rpc(Queue.Declare(queue=queue_name, durable=True, arguments=arguments))
        return int(ok.message_count or 0)

    # -- producing ----------------------------------------------------------------------------

    async def publish_job(
        self, job: Job, *, exchange: str | None = None, routing_key: str | None = None
    ) -> None:
        await self.declare(job.queue)
        publisher = await self._publisher_channel()
        await publisher.publish(
            names(job.queue)[0] if exchange is None else exchange,
            job.queue if routing_key is None else routing_key,
            orjson.dumps(job.to_json()),
            _properties(job),
        )

    async def enqueue(self, job: Job) -> None:
        await self.publish_job(job)

    @asynccontextmanager
    async def open_consumer(self, queue: str, name: str, prefetch: int) -> AsyncIterator[_Consumer]:
        await self.declare(queue)
        connection = await self.connection()
        channel = await connection.channel()
        try:
            _, messages = await channel.consume(names(queue)[1], prefetch)
            yield _Consumer(self, queue, channel, messages)
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    # -- inspection and DLQ ----------------------------------------------------------------------

    async def list_queues(self) -> list[str]:
        return sorted(self._known)

    async def stats(self, queue: str) -> QueueStats:
        await self.declare(queue)
        _, main, dlq = names(queue)
        waiting = await self._count(main)
        dead = await self._count(dlq)
        delayed = 0
        for delay_ms in sorted(self._delays.get(queue, ())):
            delayed += await self._count(
                f"iii.{queue}.delay.{delay_ms}",
                {
                    "x-message-ttl": delay_ms,
                    "x-dead-letter-exchange": names(queue)[0],
                    "x-dead-letter-routing-key": queue,
                },
            )
        return QueueStats(
            queue=queue,
            waiting=waiting,
            delayed=delayed,
            active=self._active.get(queue, 0),
            dlq=dead,
        )

    @asynccontextmanager
    async def _dlq_channel(self, queue: str) -> AsyncIterator[tuple[AmqpChannel, int]]:
        """A short-lived channel on the DLQ and its size; unacked gets are requeued at close."""
        await self.declare(queue)
        total = await self._count(names(queue)[2])
        channel = await (await self.connection()).channel()
        try:
            yield channel, total
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    @staticmethod
    def _letter(message: AmqpMessage, queue: str) -> DeadLetter:
        try:
            return DeadLetter.from_json(orjson.loads(message.body))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            job = Job(
                id=f"undecodable-{message.delivery_tag}",
                queue=queue,
                data=message.body.decode(errors="replace"),
            )
            return DeadLetter(job=job, error="undecodable message", failed_at=0)

    async def dlq_messages(
        self, queue: str, offset: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        letters: list[DeadLetter] = []
        async with self._dlq_channel(queue) as (channel, total):
            for _ in range(min(total, offset + limit)):
                message = await channel.get(names(queue)[2])
                if message is None:
                    break
                letters.append(self._letter(message, queue))
        return letters[offset:], total

    async def _move(self, queue: str, wanted: str | None, *, redrive: bool) -> int:
        moved = 0
        async with self._dlq_channel(queue) as (channel, total):
            for _ in range(total):
                message = await channel.get(names(queue)[2])
                if message is None:
                    break
                letter = self._letter(message, queue)
                if wanted is not None and letter.job.id != wanted:
                    continue  # left unacked: requeued when the channel closes
                if redrive:
                    await self.publish_job(attrs.evolve(letter.job, attempts_made=0))
                channel.ack_nowait(message.delivery_tag)
                moved += 1
                if wanted is not None:
                    break
        return moved

    async def redrive(self, queue: str) -> int:
        return await self._move(queue, None, redrive=True)

    async def redrive_message(self, queue: str, message_id: str) -> bool:
        return await self._move(queue, message_id, redrive=True) == 1

    async def discard_message(self, queue: str, message_id: str) -> bool:
        return await self._move(queue, message_id, redrive=False) == 1


@attrs.define(eq=False)
class _Consumer:
    adapter: RabbitQueueAdapter
    queue: str
    channel: AmqpChannel
    messages: trio.MemoryReceiveChannel[AmqpMessage]

    async def receive(self, timeout: float) -> Delivery | None:
        message = None
        with trio.move_on_after(timeout):
            try:
                message = await self.messages.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise AdapterUnavailableError(
                    f"AMQP consumer on {self.queue} closed: {self.channel.closed}"
                ) from None
        if message is None:
            return None
        try:
            job = Job.from_json(orjson.loads(message.body))
            attempts = message.headers.get("x-iii-attempts")
            if isinstance(attempts, int):
                job = attrs.evolve(job, attempts_made=attempts)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("queue %s: undecodable message moved to the DLQ", self.queue)
            job = Job(
                id=f"undecodable-{_now_ms()}",
                queue=self.queue,
                data=message.body.decode(errors="replace"),
            )
            await self.dead_letter(Delivery(job=job, handle=message), job, "undecodable message")
            return None
        self.adapter._active[self.queue] += 1
        return Delivery(job=job, handle=message)

    def _done(self, delivery: Delivery) -> None:
        self.adapter._active[self.queue] = max(self.adapter._active[self.queue] - 1, 0)

    async def ack(self, delivery: Delivery) -> None:
        self._done(delivery)
        self.channel.ack_nowait(delivery.handle.delivery_tag)

    async def retry(self, delivery: Delivery, job: Job, delay: float) -> None:
        delay_ms = int(delay * 1000)
        if delay_ms <= 0:
            await self.adapter.publish_job(job)
        else:
            await self.adapter.declare(self.queue)
            name = await self.adapter._declare_delay(self.queue, delay_ms)
            await self.adapter.publish_job(job, exchange="", routing_key=name)
        await self.ack(delivery)

    async def dead_letter(self, delivery: Delivery, job: Job, error: str) -> None:
        letter = DeadLetter(job=job, error=error, failed_at=_now_ms())
        await self.adapter.declare(self.queue)
        publisher = await self.adapter._publisher_channel()
        await publisher.publish(
            "",
            names(self.queue)[2],
            orjson.dumps(letter.to_json()),
            Basic.Properties(content_type="application/json", delivery_mode=2, message_id=job.id),
        )
        if (
            isinstance(delivery.handle, AmqpMessage)
            and delivery.job is not job
            or delivery.handle is not None
        ):
            if delivery.job.id.startswith("undecodable-"):
                self.channel.ack_nowait(delivery.handle.delivery_tag)
                return
        await self.ack(delivery)

    async def release(self, delivery: Delivery) -> None:
        self._done(delivery)
        self.channel.nack_nowait(delivery.handle.delivery_tag, requeue=True)

    async def extend(self, deliveries: list[Delivery]) -> None:
        return None  # the broker keeps unacked messages while the channel lives


@asynccontextmanager
async def open_adapter(config: Config, hooks: None) -> AsyncIterator[RabbitQueueAdapter]:
    adapter = RabbitQueueAdapter(defaults=config.defaults, url=config.amqp_url)
    async with trio.open_nursery() as adapter_nursery:
        adapter._nursery = adapter_nursery
        await adapter.connection()  # fail at start if the broker is unreachable
        try:
            yield adapter
        finally:
            adapter_nursery.cancel_scope.cancel()
