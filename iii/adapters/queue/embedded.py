"""The embedded queue backend (``modules::queue::BuiltinQueueAdapter``, or
``embedded``): in memory, durable when file-based.

Config (:class:`Config`): the keys of every queue backend
(:class:`~iii.adapters.queue.base.BackendConfig`), ``store_method``
(``in_memory``, or ``file_based``; any other value means in_memory, with a
warning, as upstream), ``file_path`` (a directory), and upstream's
``save_interval_ms`` and ``channel_size`` (accepted, unused: every change
is written at once).

State per queue: the live jobs, a FIFO of ready ids, a heap of delayed ids
(due time in wall-clock ms, so it survives a restart), the leased ids with
their lease expiry, and the dead-letter entries in arrival order.

Persistence (``store_method: file_based``): every change is a record in an
fsync'd append-only :class:`~iii.adapters.filelog.RecordLog`,
``<file_path>/_queue.log``, the queue's own file.  ``enqueue`` returns after
its record is durable, so an acknowledged job survives ``kill -9``.  At open
the log is replayed: jobs that were leased when the engine died are ready
again (redelivered), delayed ones keep their due time.  The log is compacted
(crash-safe rewrite of the live state) once it holds far more records than
live jobs.  Records::

    {"e": queue, "j": job}                 enqueued (or redriven: attempts reset)
    {"a": queue, "i": id}                  acked
    {"r": queue, "j": job, "d": due_ms}    retry scheduled
    {"x": queue, "l": dead_letter}         dead-lettered
    {"dd": queue, "i": id}                 DLQ entry discarded

A change is applied in memory *before* its record is queued for the log, so
a compaction snapshot always includes it (filelog's rewrite contract); a new
job only becomes visible to consumers once its record is durable.  Each
record is framed (and so checked against the log's record limit) *before*
memory changes: a job whose record would leave less than
:data:`RECORD_HEADROOM` below the limit is refused at ``enqueue``
(``VALUE_TOO_LARGE``), so its later retry and dead-letter records always
fit; a dead letter keeps at most :data:`DLQ_ERROR_LIMIT` characters of the
error.

Lifetime: :func:`open_adapter` owns the log and a nursery for compaction; a
lease that expires (a consumer cancelled without releasing) is put back by
the next ``receive`` on that queue.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from iii.adapters.filelog import RecordLog, RecordTooLargeError, open_record_log
from iii.adapters.queue.base import (
    BackendConfig,
    DeadLetter,
    Delivery,
    Job,
    QueueDefaults,
    QueueStats,
)
from iii.config_schema import Count

__all__ = ["Config", "EmbeddedQueueAdapter", "open_adapter"]

log = logging.getLogger(__name__)

LOG_NAME = "_queue.log"
# A dead letter keeps this much of the error (a worker's message can be as
# large as a frame); the rest is cut.
DLQ_ERROR_LIMIT = 4096
# What a job's enqueue record must leave free below the log's record limit:
# its retry record adds a due time, its dead letter the (cut) error, escaped.
RECORD_HEADROOM = 6 * DLQ_ERROR_LIMIT + 1024


@attrs.frozen(kw_only=True)
class Config(BackendConfig):
    store_method: str = "in_memory"
    file_path: str = "kv_store_data.db"
    save_interval_ms: Count = Count(5000)  # upstream's; unused
    channel_size: Count = Count(256)  # upstream's; unused


def _now_ms() -> int:
    return int(time.time() * 1000)


@attrs.define(eq=False)
class _Queue:
    name: str
    jobs: dict[str, Job] = attrs.field(factory=dict)
    ready: deque[str] = attrs.field(factory=deque)
    delayed: list[tuple[int, str]] = attrs.field(factory=list)  # (due ms, id)
    leased: dict[str, float] = attrs.field(factory=dict)  # id -> lease expiry (trio clock)
    dlq: dict[str, DeadLetter] = attrs.field(factory=dict)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def promote_due(self) -> None:
        now = _now_ms()
        while self.delayed and self.delayed[0][0] <= now:
            _, job_id = heapq.heappop(self.delayed)
            if job_id in self.jobs:
                self.ready.append(job_id)


@attrs.define(eq=False)
class EmbeddedQueueAdapter:
    defaults: QueueDefaults
    record_log: RecordLog | None = None
    queues: dict[str, _Queue] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None
    _compacting: bool = False

    def _queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue(name)
        return queue

    def _frame(self, record: dict[str, Any], headroom: int = 0) -> bytes | None:
        """The log frame of a change, made before the change is applied: a
        record the log would refuse raises here, with nothing changed."""
        if self.record_log is None:
            return None
        frame = self.record_log.encode(record)
        if len(frame) > self.record_log.max_record - headroom:
            raise RecordTooLargeError(
                f"a job of {len(frame)} bytes is more than this queue's log takes "
                f"({self.record_log.max_record - headroom})"
            )
        return frame

    async def _append(self, frame: bytes | None) -> None:
        if self.record_log is None or frame is None:
            return
        await self.record_log.append_encoded((frame,))
        self._maybe_compact()

    async def _log(self, record: dict[str, Any]) -> None:
        await self._append(self._frame(record))

    # -- producing ---------------------------------------------------------------

    async def enqueue(self, job: Job) -> None:
        frame = self._frame({"e": job.queue, "j": job.to_json()}, RECORD_HEADROOM)
        queue = self._queue(job.queue)
        queue.jobs[job.id] = job
        try:
            await self._append(frame)
        except BaseException:
            queue.jobs.pop(job.id, None)
            raise
        queue.ready.append(job.id)
        queue.wake()

    @asynccontextmanager
    async def open_consumer(self, queue: str, name: str, prefetch: int) -> AsyncIterator[_Consumer]:
        yield _Consumer(self, self._queue(queue), self.defaults.visibility_timeout)

    # -- inspection and DLQ ----------------------------------------------------------

    async def list_queues(self) -> list[str]:
        return sorted(self.queues)

    async def stats(self, queue: str) -> QueueStats:
        q = self.queues.get(queue)
        if q is None:
            return QueueStats(queue=queue)
        q.promote_due()
        return QueueStats(
            queue=queue,
            waiting=len(q.ready),
            delayed=len(q.delayed),
            active=len(q.leased),
            dlq=len(q.dlq),
        )

    async def dlq_messages(
        self, queue: str, offset: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        q = self.queues.get(queue)
        if q is None:
            return [], 0
        entries = list(q.dlq.values())
        return entries[offset : offset + limit], len(entries)

    async def redrive(self, queue: str) -> int:
        q = self.queues.get(queue)
        if q is None:
            return 0
        count = 0
        for message_id in list(q.dlq):
            if await self.redrive_message(queue, message_id):
                count += 1
        return count

    async def redrive_message(self, queue: str, message_id: str) -> bool:
        q = self.queues.get(queue)
        if q is None or message_id not in q.dlq:
            return False
        job = attrs.evolve(q.dlq[message_id].job, attempts_made=0)
        frame = self._frame({"e": queue, "j": job.to_json()})
        del q.dlq[message_id]
        q.jobs[job.id] = job
        await self._append(frame)
        q.ready.append(job.id)
        q.wake()
        return True

    async def discard_message(self, queue: str, message_id: str) -> bool:
        q = self.queues.get(queue)
        if q is None or q.dlq.pop(message_id, None) is None:
            return False
        await self._log({"dd": queue, "i": message_id})
        return True

    # -- persistence -------------------------------------------------------------------

    def replay(self, records: list[Any]) -> None:
        """Rebuild the queues from log records (see the module docstring)."""
        order: dict[str, dict[str, int]] = {}  # queue -> job id -> enqueue sequence
        due: dict[str, dict[str, int]] = {}  # queue -> job id -> due ms (retry scheduled)
        for seq, record in enumerate(records):
            if "e" in record:
                job = Job.from_json(record["j"])
                self._queue(record["e"]).jobs[job.id] = job
                order.setdefault(record["e"], {})[job.id] = seq
                due.setdefault(record["e"], {}).pop(job.id, None)
            elif "r" in record:
                job = Job.from_json(record["j"])
                self._queue(record["r"]).jobs[job.id] = job
                due.setdefault(record["r"], {})[job.id] = int(record["d"])
            elif "a" in record:
                self._queue(record["a"]).jobs.pop(record["i"], None)
                due.get(record["a"], {}).pop(record["i"], None)
            elif "x" in record:
                letter = DeadLetter.from_json(record["l"])
                q = self._queue(record["x"])
                q.jobs.pop(letter.job.id, None)
                due.get(record["x"], {}).pop(letter.job.id, None)
                q.dlq.pop(letter.job.id, None)
                q.dlq[letter.job.id] = letter
            elif "dd" in record:
                self._queue(record["dd"]).dlq.pop(record["i"], None)
        for q in self.queues.values():
            q_due = due.get(q.name, {})
            q_order = order.get(q.name, {})
            q.delayed = [(when, job_id) for job_id, when in q_due.items() if job_id in q.jobs]
            heapq.heapify(q.delayed)
            q.ready = deque(
                sorted(
                    (job_id for job_id in q.jobs if job_id not in q_due),
                    key=lambda i: q_order.get(i, -1),
                )
            )

    def snapshot(self) -> Iterator[dict[str, Any]]:
        """The live state as log records.

        A generator on purpose: :meth:`RecordLog.rewrite` consumes it under the
        log's lock, after every record queued so far, which it then drops.  A
        list built before waiting for the lock would miss the changes made
        meanwhile, and lose them from the log.
        """
        for q in self.queues.values():
            delayed = {job_id: due for due, job_id in q.delayed}
            for job_id, job in q.jobs.items():
                if job_id in delayed:
                    yield {"r": q.name, "j": job.to_json(), "d": delayed[job_id]}
                else:
                    yield {"e": q.name, "j": job.to_json()}
            for letter in q.dlq.values():
                yield {"x": q.name, "l": letter.to_json()}

    def _maybe_compact(self) -> None:
        record_log = self.record_log
        if record_log is None or self._compacting or self._nursery is None:
            return
        live = sum(len(q.jobs) + len(q.dlq) for q in self.queues.values())
        if record_log.records_since_rewrite > 4 * live + 10_000:
            self._compacting = True
            self._nursery.start_soon(self._compact)

    async def _compact(self) -> None:
        assert self.record_log is not None
        try:
            await self.record_log.rewrite(self.snapshot())
        except OSError:
            log.exception("queue log compaction failed; the log keeps growing")
        finally:
            self._compacting = False


@attrs.define(eq=False)
class _Consumer:
    adapter: EmbeddedQueueAdapter
    queue: _Queue
    visibility_timeout: float
    _next_reap: float = 0.0

    def _reap_expired(self) -> None:
        now = trio.current_time()
        if now < self._next_reap:
            return
        self._next_reap = now + 1.0
        expired = [job_id for job_id, expiry in self.queue.leased.items() if expiry <= now]
        for job_id in expired:
            del self.queue.leased[job_id]
            if job_id in self.queue.jobs:
                log.info(
                    "queue %s: lease on job %s expired; it is delivered again",
                    self.queue.name,
                    job_id,
                )
                self.queue.ready.appendleft(job_id)

    async def receive(self, timeout: float) -> Delivery | None:
        q = self.queue
        deadline = trio.current_time() + timeout
        while True:
            self._reap_expired()
            q.promote_due()
            while q.ready:
                job_id = q.ready.popleft()
                job = q.jobs.get(job_id)
                if job is None or job_id in q.leased:
                    continue
                q.leased[job_id] = trio.current_time() + self.visibility_timeout
                return Delivery(job=job, handle=job_id)
            wait_until = deadline
            if q.delayed:
                due_in = (q.delayed[0][0] - _now_ms()) / 1000
                wait_until = min(wait_until, trio.current_time() + max(due_in, 0.0))
            if q.leased:
                wait_until = min(wait_until, self._next_reap)
            if trio.current_time() >= deadline:
                return None
            with trio.move_on_at(wait_until):
                await q.changed.wait()

    async def ack(self, delivery: Delivery) -> None:
        q = self.queue
        job_id = delivery.job.id
        q.leased.pop(job_id, None)
        if q.jobs.pop(job_id, None) is not None:
            await self.adapter._log({"a": q.name, "i": job_id})

    async def retry(self, delivery: Delivery, job: Job, delay: float) -> None:
        q = self.queue
        due = _now_ms() + int(delay * 1000)
        frame = self.adapter._frame({"r": q.name, "j": job.to_json(), "d": due})
        q.leased.pop(job.id, None)
        q.jobs[job.id] = job
        heapq.heappush(q.delayed, (due, job.id))
        q.wake()
        await self.adapter._append(frame)

    async def dead_letter(self, delivery: Delivery, job: Job, error: str) -> None:
        q = self.queue
        if len(error) > DLQ_ERROR_LIMIT:
            error = error[:DLQ_ERROR_LIMIT] + f"… ({len(error) - DLQ_ERROR_LIMIT} more characters)"
        letter = DeadLetter(job=job, error=error, failed_at=_now_ms())
        frame = self.adapter._frame({"x": q.name, "l": letter.to_json()})
        q.leased.pop(job.id, None)
        q.jobs.pop(job.id, None)
        q.dlq[job.id] = letter
        await self.adapter._append(frame)

    async def release(self, delivery: Delivery) -> None:
        q = self.queue
        if q.leased.pop(delivery.job.id, None) is not None and delivery.job.id in q.jobs:
            q.ready.appendleft(delivery.job.id)
            q.wake()

    async def extend(self, deliveries: list[Delivery]) -> None:
        expiry = trio.current_time() + self.visibility_timeout
        for delivery in deliveries:
            if delivery.job.id in self.queue.leased:
                self.queue.leased[delivery.job.id] = expiry


@asynccontextmanager
async def open_adapter(config: Config, hooks: None) -> AsyncIterator[EmbeddedQueueAdapter]:
    adapter = EmbeddedQueueAdapter(defaults=config.defaults)
    method = config.store_method
    if method not in ("in_memory", "file_based"):
        log.warning("embedded queue: unknown store_method %r, using in_memory", method)
        method = "in_memory"
    async with trio.open_nursery() as adapter_nursery:
        adapter._nursery = adapter_nursery
        if method == "file_based":
            directory = config.file_path
            record_log, records, recovery = await open_record_log(Path(directory) / LOG_NAME)
            adapter.record_log = record_log
            adapter.replay(records)
            pending = sum(len(q.jobs) for q in adapter.queues.values())
            log.info(
                "embedded queue: %d records replayed from %s, %d jobs pending",
                recovery.records,
                record_log.path,
                pending,
            )
        try:
            yield adapter
        finally:
            adapter_nursery.cancel_scope.cancel()
            if adapter.record_log is not None:
                with trio.CancelScope(shield=True):
                    await adapter.record_log.aclose()
