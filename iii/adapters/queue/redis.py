"""The Redis queue backend (``modules::queue::RedisAdapter``): Redis Streams with one
consumer group per queue.

Not upstream's PUBLISH/SUBSCRIBE, which loses every message nobody listens
for.  Keys (``key_prefix`` defaults to ``iii:queue:``)::

    <p><queue>:stream    stream of ready jobs, field "job" = job JSON;
                         consumer group "iii" (every engine instance and every
                         trigger on the queue is a consumer: they share the work)
    <p><queue>:delayed   sorted set: job JSON scored by due time (ms): retries
    <p><queue>:dlq       list of {job, error, failed_at} JSON, oldest first
    <p>queues            set of queue names

* ``enqueue`` = ``XADD`` (+ ``SADD`` of the name) in one MULTI; it returns once
  Redis has the job.
* ``receive`` = ``XREADGROUP … >`` (one job per call, so a consumer never
  holds more than its concurrency).  Each consumer also runs ``XAUTOCLAIM``
  with ``visibility_timeout`` as the minimum idle time: jobs leased by an
  engine that died (or got stuck) are delivered again.  Leases of running
  jobs are renewed with ``XCLAIM … JUSTID`` (resets the idle time).  An entry
  that is not a readable job (written by something else) goes to the DLQ as
  ``undecodable message`` instead of failing the consumer.
* ``ack`` = ``XACK`` + ``XDEL``; ``retry`` = that + ``ZADD delayed``;
  ``dead_letter`` = that + ``RPUSH dlq``; each in one MULTI transaction.
  Due retries move back to the stream with a Lua script (``ZRANGEBYSCORE`` →
  ``XADD`` + ``ZREM``), atomic, so two engines never move one twice.
* Redrive moves a DLQ entry with a Lua ``LREM``-then-``XADD``, so a message
  redriven from two engines at once is moved once.

Config: ``redis_url`` (``redis://localhost:6379``), ``key_prefix``, and the
common ``max_attempts``, ``backoff_ms``, ``concurrency``, ``poll_interval_ms``,
``mode``, ``visibility_timeout_ms``.

Lifetime: :func:`open_adapter` owns the coredis client (its pool runs tasks
of its own, in coredis's scope) until the module exits.  Every command has a
timeout; failures become :class:`~iii.errors.AdapterUnavailableError`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import coredis
import coredis.exceptions
import orjson
import trio

from iii.adapters.queue.base import (
    DeadLetter,
    Delivery,
    Job,
    QueueDefaults,
    QueueStats,
    RedisQueueConfig,
)
from iii.errors import AdapterUnavailableError

__all__ = ["Config", "RedisQueueAdapter", "open_adapter"]

log = logging.getLogger(__name__)

GROUP = "iii"
COMMAND_TIMEOUT = 5.0

Config = RedisQueueConfig  # declared in iii.adapters.queue.base (read without importing coredis)

PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'job', member)
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

REDRIVE_ONE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], '*', 'job', ARGV[2])
  return 1
end
return 0
"""

# anyio's resource errors: a connection of the pool closed under us (module exit).
STATS = """
local length = redis.call('XLEN', KEYS[1])
local pending = 0
local summary = redis.pcall('XPENDING', KEYS[1], 'iii')
if type(summary) == 'table' and summary.err == nil then pending = summary[1] end
return {length, pending, redis.call('ZCARD', KEYS[2]), redis.call('LLEN', KEYS[3])}
"""

_ERRORS = (
    coredis.exceptions.RedisError,
    OSError,
    trio.TooSlowError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@asynccontextmanager
async def _translated(what: str, timeout: float = COMMAND_TIMEOUT) -> AsyncIterator[None]:
    try:
        with trio.fail_after(timeout):
            yield
    except _ERRORS as exc:
        raise AdapterUnavailableError(f"Redis {what} failed: {exc or type(exc).__name__}") from exc


@attrs.define(eq=False)
class RedisQueueAdapter:
    defaults: QueueDefaults
    client: Any
    prefix: str
    _promote: Any = None
    _redrive_one: Any = None
    _stats: Any = None

    def key(self, queue: str, part: str) -> str:
        return f"{self.prefix}{queue}:{part}"

    async def enqueue(self, job: Job) -> None:
        async with _translated("enqueue"):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(self.key(job.queue, "stream"), {"job": _dumps(job.to_json())})
                pipe.sadd(f"{self.prefix}queues", [job.queue])

    @asynccontextmanager
    async def open_consumer(self, queue: str, name: str, prefetch: int) -> AsyncIterator[_Consumer]:
        stream = self.key(queue, "stream")
        async with _translated("consumer group create"):
            try:
                await self.client.xgroup_create(stream, GROUP, "0", mkstream=True)
            except coredis.exceptions.StreamDuplicateConsumerGroupError:
                pass  # another consumer or engine made it
            await self.client.sadd(f"{self.prefix}queues", [queue])
        consumer = _Consumer(self, queue, name)
        try:
            yield consumer
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    pending = await self.client.xpending(stream, GROUP, "-", "+", 1, consumer=name)
                    if not pending:
                        await self.client.xgroup_delconsumer(stream, GROUP, name)
                except _ERRORS as exc:
                    log.debug("could not remove consumer %s: %s", name, exc)

    async def promote(self, queue: str) -> int:
        async with _translated("promote"):
            moved = await self._promote(
                keys=[self.key(queue, "delayed"), self.key(queue, "stream")], args=[_now_ms()]
            )
        return int(moved or 0)

    async def list_queues(self) -> list[str]:
        async with _translated("list queues"):
            names = await self.client.smembers(f"{self.prefix}queues")
        return sorted(names)

    async def stats(self, queue: str) -> QueueStats:
        await self.promote(queue)
        async with _translated("stats"):
            # One script: a consistent snapshot (a job is never counted twice or lost
            # between two reads while it moves to the DLQ).
            length, active, delayed, dlq = await self._stats(
                keys=[self.key(queue, "stream"), self.key(queue, "delayed"), self.key(queue, "dlq")]
            )
        return QueueStats(
            queue=queue,
            waiting=max(int(length) - int(active), 0),
            delayed=int(delayed),
            active=int(active),
            dlq=int(dlq),
        )

    async def dlq_messages(
        self, queue: str, offset: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        async with _translated("dlq read"):
            raw = await self.client.lrange(self.key(queue, "dlq"), offset, offset + limit - 1)
            total = await self.client.llen(self.key(queue, "dlq"))
        return [DeadLetter.from_json(orjson.loads(item)) for item in raw], total

    async def _dlq_entries(self, queue: str) -> list[str]:
        async with _translated("dlq read"):
            return list(await self.client.lrange(self.key(queue, "dlq"), 0, -1))

    async def _redrive_raw(self, queue: str, raw: str) -> bool:
        letter = DeadLetter.from_json(orjson.loads(raw))
        job = attrs.evolve(letter.job, attempts_made=0)
        async with _translated("redrive"):
            moved = await self._redrive_one(
                keys=[self.key(queue, "dlq"), self.key(queue, "stream")],
                args=[raw, _dumps(job.to_json())],
            )
        return bool(moved)

    async def redrive(self, queue: str) -> int:
        count = 0
        for raw in await self._dlq_entries(queue):
            if await self._redrive_raw(queue, raw):
                count += 1
        return count

    async def redrive_message(self, queue: str, message_id: str) -> bool:
        for raw in await self._dlq_entries(queue):
            if orjson.loads(raw)["job"]["id"] == message_id:
                return await self._redrive_raw(queue, raw)
        return False

    async def discard_message(self, queue: str, message_id: str) -> bool:
        for raw in await self._dlq_entries(queue):
            if orjson.loads(raw)["job"]["id"] == message_id:
                async with _translated("discard"):
                    return bool(await self.client.lrem(self.key(queue, "dlq"), 1, raw))
        return False


@attrs.define(eq=False)
class _Consumer:
    adapter: RedisQueueAdapter
    queue: str
    name: str
    buffer: deque[Delivery] = attrs.field(factory=deque)
    _next_promote: float = 0.0
    _next_reclaim: float = 0.0

    @property
    def stream(self) -> str:
        return self.adapter.key(self.queue, "stream")

    async def _take(self, entry: Any) -> Delivery | None:
        """The delivery for a stream entry; an entry that is not a readable job
        is settled here (dropped, or moved to the DLQ) so it cannot block the group."""
        raw = entry.field_values.get("job")
        if raw is None:  # not ours
            await self._remove(entry.identifier)
            return None
        try:
            job = Job.from_json(orjson.loads(raw))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("queue %s: undecodable job %s moved to the DLQ", self.queue, entry.identifier)
            job = Job(id=f"undecodable-{entry.identifier}", queue=self.queue, data=raw)
            letter = DeadLetter(job=job, error="undecodable message", failed_at=_now_ms())
            dlq = self.adapter.key(self.queue, "dlq")
            await self._remove(
                entry.identifier, lambda pipe: pipe.rpush(dlq, [_dumps(letter.to_json())])
            )
            return None
        return Delivery(job=job, handle=entry.identifier)

    async def receive(self, timeout: float) -> Delivery | None:
        adapter = self.adapter
        defaults = adapter.defaults
        now = trio.current_time()
        if now >= self._next_promote:
            self._next_promote = now + defaults.poll_interval
            await adapter.promote(self.queue)
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(defaults.visibility_timeout / 2, 0.2)
            async with _translated("reclaim"):
                claimed = await adapter.client.xautoclaim(
                    self.stream,
                    GROUP,
                    self.name,
                    int(defaults.visibility_timeout * 1000),
                    "0-0",
                    count=10,
                )
            for entry in claimed[1]:
                delivery = await self._take(entry)
                if delivery is not None:
                    log.info(
                        "queue %s: job %s reclaimed after its lease ran out",
                        self.queue,
                        delivery.job.id,
                    )
                    self.buffer.append(delivery)
        if self.buffer:
            return self.buffer.popleft()
        block = max(int(min(timeout, defaults.poll_interval * 5, 1.0) * 1000), 1)
        async with _translated("read", COMMAND_TIMEOUT + block / 1000):
            result = await adapter.client.xreadgroup(
                GROUP, self.name, streams={self.stream: ">"}, count=1, block=block
            )
        if not result:
            return None
        for entries in result.values():
            for entry in entries:
                delivery = await self._take(entry)
                if delivery is not None:
                    self.buffer.append(delivery)
        return self.buffer.popleft() if self.buffer else None

    async def _remove(self, entry_id: str, extra: Any = None) -> None:
        async with _translated("settle"):
            async with self.adapter.client.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, GROUP, [entry_id])
                pipe.xdel(self.stream, [entry_id])
                if extra is not None:
                    extra(pipe)

    async def ack(self, delivery: Delivery) -> None:
        await self._remove(delivery.handle)

    async def retry(self, delivery: Delivery, job: Job, delay: float) -> None:
        due = _now_ms() + int(delay * 1000)
        delayed = self.adapter.key(self.queue, "delayed")
        await self._remove(
            delivery.handle, lambda pipe: pipe.zadd(delayed, {_dumps(job.to_json()): due})
        )

    async def dead_letter(self, delivery: Delivery, job: Job, error: str) -> None:
        letter = DeadLetter(job=job, error=error, failed_at=_now_ms())
        dlq = self.adapter.key(self.queue, "dlq")
        await self._remove(
            delivery.handle, lambda pipe: pipe.rpush(dlq, [_dumps(letter.to_json())])
        )

    async def release(self, delivery: Delivery) -> None:
        body = _dumps(delivery.job.to_json())
        await self._remove(delivery.handle, lambda pipe: pipe.xadd(self.stream, {"job": body}))

    async def extend(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        async with _translated("lease renewal"):
            await self.adapter.client.xclaim(
                self.stream, GROUP, self.name, 0, [d.handle for d in deliveries], justid=True
            )


@asynccontextmanager
async def open_adapter(config: Config, hooks: None) -> AsyncIterator[RedisQueueAdapter]:
    url, prefix, defaults = config.redis_url, config.key_prefix, config.defaults
    client = coredis.Redis.from_url(
        url, decode_responses=True, connect_timeout=5, stream_timeout=None
    )
    async with client:
        async with _translated(f"connect to {url}"):
            await client.ping()
        adapter = RedisQueueAdapter(defaults=defaults, client=client, prefix=prefix)
        adapter._promote = client.register_script(PROMOTE)
        adapter._redrive_one = client.register_script(REDRIVE_ONE)
        adapter._stats = client.register_script(STATS)
        yield adapter
