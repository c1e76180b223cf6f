"""Queues kept in another engine (``modules::queue::adapters::Bridge``).

The jobs live in the remote engine's queue module; this engine's ``queue``
triggers consume them there and run them here.  One link per adapter
(:mod:`iii.adapters.bridge_link`, config ``bridge_url``, ``token``,
``ca_file``, ``call_timeout_ms``), shown on the remote as the worker
``iii-queue-bridge``.

* **Topic jobs** (``enqueue {topic, data}`` here): ``enqueue {topic, data}``
  on the remote, with the caller's trace context.  It is a request/response
  call (upstream's Bridge fires and forgets): the remote answers once the job
  is durable there, so ``enqueue`` here answers only then, and fails at once
  (``enqueue_error``, "the link … is down") while the link is down.
* **Consuming**: for each ``queue`` trigger registered here (each consumer the
  module opens), the adapter exposes ``queue::bridge::on_message::<uuid>`` on
  the remote and binds a remote ``queue`` trigger ``{topic, concurrency}`` to
  it.  Each job the remote hands to it is given to the module's consumer
  (:meth:`BridgeConsumer.receive`), which runs this engine's handler (under
  the local trigger's grant and condition), and the outcome goes back as the
  answer: an ack answers null, a failure (retry or dead letter here) answers
  an error, which the remote counts as a failed attempt.  A job cut off
  because its trigger here went away (its worker left) is not answered: the
  remote trigger is unregistered first, and the remote takes the job back
  without counting an attempt.  **Retries, backoff,
  the DLQ and its functions are the remote's**, by its own policy
  (``queue_configs`` and adapter settings there); the inspection functions
  (``engine::queue::list_topics``, ``topic_stats``, ``dlq_messages``,
  ``iii::queue::redrive`` …) here ask the remote.
* **Function queues** (``invokefunction`` with ``action: {type: enqueue,
  queue}``): ``engine::queue::enqueue`` on the remote, as upstream's Bridge
  (``publish_to_function_queue``): the remote runs the job with *its*
  function of that id (a function this engine exposes there through a
  BridgeClient works).  Nothing is consumed here for them.

Guarantee: **at least once**, across a link drop too.  A job is acked on the
remote only after this engine's handler answered.  When the link drops while
jobs run here, the remote sees its worker (the link) go and releases them,
and they are delivered again once the link is back (the remote's builtin
file store also keeps them across its own restart); the runs cut off here
still finish here, so a job may run twice.  A job that runs longer than the
remote's invocation timeout is likewise retried by the remote.

Lifetime: :func:`open_adapter` owns the link; each consumer's exposed
function and remote trigger live in its :meth:`BridgeQueueAdapter.open_consumer`
block, and jobs waiting in it are failed back to the remote when it closes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import trio

from iii.adapters.bridge_link import (
    BridgeLink,
    open_bridge_link,
)
from iii.adapters.queue.base import (
    BridgeQueueConfig,
    DeadLetter,
    Delivery,
    Job,
    QueueDefaults,
    QueueStats,
)
from iii.errors import IIIError
from iii.link import TraceContext

__all__ = [
    "Config",
    "BridgeQueueAdapter",
    "BridgeConsumer",
    "open_adapter",
    "FUNCTION_QUEUE_PREFIX",
]

log = logging.getLogger(__name__)

WORKER_NAME: Final = "iii-queue-bridge"
FUNCTION_QUEUE_PREFIX: Final = "@"  # iii.modules.queue's name for function queues


# Declared in iii.adapters.queue.base (read without importing the link).
Config = BridgeQueueConfig


def _bad_answer(function_id: str, what: str) -> IIIError:
    return IIIError(
        f"the remote engine answered {function_id} with {what}", code="bad_remote_answer"
    )


def _ref(queue: str) -> dict[str, str]:
    """The remote's ``{topic}`` or ``{queue}`` for an adapter queue name."""
    if queue.startswith(FUNCTION_QUEUE_PREFIX):
        return {"queue": queue[len(FUNCTION_QUEUE_PREFIX) :]}
    return {"topic": queue}


def _count(answer: Any, key: str) -> int:
    value = answer.get(key, 0) if isinstance(answer, dict) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@attrs.define(eq=False)
class _Outcome:
    """The answer a job delivered by the remote is waiting for."""

    done: trio.Event = attrs.field(factory=trio.Event)
    error: IIIError | None = None

    def finish(self, error: IIIError | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@attrs.define(eq=False)
class BridgeConsumer:
    """The module's consumer of one topic: jobs the remote hands over, one channel."""

    queue: str
    send: trio.MemorySendChannel[Delivery]
    receive_channel: trio.MemoryReceiveChannel[Delivery]
    waiting: set[_Outcome] = attrs.field(factory=set)
    closed: bool = False

    async def on_job(self, data: Any, trace: TraceContext) -> None:
        """The remote's call of the exposed function: hand the job over, answer its outcome."""
        outcome = _Outcome()
        job = Job(
            id=str(uuid.uuid4()),
            queue=self.queue,
            data=data,
            max_attempts=1,  # retries are the remote's: a failure here is answered at once
            traceparent=trace.traceparent,
            baggage=trace.baggage,
        )
        if self.closed:
            raise IIIError("this engine's consumer is going away", code="invocation_stopped")
        self.waiting.add(outcome)
        try:
            try:
                await self.send.send(Delivery(job, outcome))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise IIIError(
                    "this engine's consumer is going away", code="invocation_stopped"
                ) from None
            await outcome.done.wait()
        finally:
            self.waiting.discard(outcome)
        if outcome.error is not None:
            raise outcome.error
        return None

    def close(self) -> None:
        self.closed = True
        self.send.close()
        for outcome in list(self.waiting):
            outcome.finish(IIIError("this engine's consumer went away", code="invocation_stopped"))

    # -- QueueConsumer ------------------------------------------------------------------

    async def receive(self, timeout: float) -> Delivery | None:  # noqa: ASYNC109 (the Protocol's)
        with trio.move_on_after(timeout):
            try:
                return await self.receive_channel.receive()
            except trio.EndOfChannel:
                await trio.sleep(timeout)
        return None

    async def ack(self, delivery: Delivery) -> None:
        delivery.handle.finish()

    async def retry(self, delivery: Delivery, job: Job, delay: float) -> None:
        delivery.handle.finish(IIIError("the job failed on the bridge engine", code="job_failed"))

    async def dead_letter(self, delivery: Delivery, job: Job, error: str) -> None:
        delivery.handle.finish(IIIError(error, code="job_failed"))

    async def release(self, delivery: Delivery) -> None:
        """Given back unprocessed: not answered now.

        The module releases a job when its trigger went away (or at shutdown),
        and the consumer closes next: :meth:`BridgeQueueAdapter.open_consumer`
        unregisters the remote trigger first, and the remote then takes its
        calls in flight back without counting an attempt; the answer
        :meth:`close` sends after that is too late to count.  (A job released
        while the consumer stays open comes back after the remote's invocation
        timeout, as a failed attempt.)
        """
        return None

    async def extend(self, deliveries: list[Delivery]) -> None:
        return None  # the remote holds the lease while its call to us is in flight


class _IdleConsumer:
    """A function queue's consumer: the remote runs those jobs itself."""

    async def receive(self, timeout: float) -> Delivery | None:  # noqa: ASYNC109 (the Protocol's)
        await trio.sleep(timeout)
        return None

    async def ack(self, delivery: Delivery) -> None: ...

    async def retry(self, delivery: Delivery, job: Job, delay: float) -> None: ...

    async def dead_letter(self, delivery: Delivery, job: Job, error: str) -> None: ...

    async def release(self, delivery: Delivery) -> None: ...

    async def extend(self, deliveries: list[Delivery]) -> None: ...


@attrs.define(eq=False)
class BridgeQueueAdapter:
    bridge: BridgeLink
    defaults: QueueDefaults

    @property
    def link(self) -> Any:
        return self.bridge.link

    async def enqueue(self, job: Job) -> None:
        trace = TraceContext(traceparent=job.traceparent, baggage=job.baggage)
        if job.function_id is None:
            await self.bridge.call("enqueue", {"topic": job.queue, "data": job.data}, trace=trace)
            return
        request: dict[str, Any] = {
            **_ref(job.queue),
            "function_id": job.function_id,
            "data": job.data,
            "messageReceiptId": job.id,
        }
        if job.traceparent is not None:
            request["traceparent"] = job.traceparent
        if job.baggage is not None:
            request["baggage"] = job.baggage
        await self.bridge.call("engine::queue::enqueue", request, trace=trace)

    @asynccontextmanager
    async def open_consumer(self, queue: str, name: str, prefetch: int) -> AsyncIterator[Any]:
        if queue.startswith(FUNCTION_QUEUE_PREFIX):
            yield _IdleConsumer()
            return
        send, receive = trio.open_memory_channel[Delivery](0)
        consumer = BridgeConsumer(queue, send, receive)
        key = uuid.uuid4().hex
        handler_id = f"queue::bridge::on_message::{key}"
        trigger_id = f"queue-bridge-{key}"
        link = self.bridge.link
        link.expose(
            handler_id, consumer.on_job, description=f"Jobs of {queue} for the bridge engine"
        )
        link.register_trigger(
            trigger_id, "queue", handler_id, {"topic": queue, "concurrency": prefetch}
        )
        try:
            yield consumer
        finally:
            link.unregister_trigger(trigger_id)
            link.unexpose(handler_id)
            consumer.close()

    async def list_queues(self) -> list[str]:
        answer = await self.bridge.call("engine::queue::list_topics", {})
        topics = answer.get("topics") if isinstance(answer, dict) else None
        if not isinstance(topics, list):
            raise _bad_answer("engine::queue::list_topics", "no topic list")
        names = []
        for entry in topics:
            if isinstance(entry, dict) and isinstance(entry.get("topic"), str):
                prefix = FUNCTION_QUEUE_PREFIX if entry.get("kind") == "queue" else ""
                names.append(prefix + entry["topic"])
        return names

    async def stats(self, queue: str) -> QueueStats:
        answer = await self.bridge.call("engine::queue::topic_stats", _ref(queue))
        return QueueStats(
            queue=queue,
            waiting=_count(answer, "waiting"),
            delayed=_count(answer, "delayed"),
            active=_count(answer, "active"),
            dlq=_count(answer, "dlq"),
        )

    async def dlq_messages(
        self, queue: str, offset: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        function_id = "engine::queue::dlq_messages"
        answer = await self.bridge.call(
            function_id, {**_ref(queue), "offset": offset, "limit": limit}
        )
        messages = answer.get("messages") if isinstance(answer, dict) else None
        if not isinstance(messages, list):
            raise _bad_answer(function_id, "no message list")
        letters = []
        for entry in messages:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise _bad_answer(function_id, "a malformed message")
            function = entry.get("function_id")
            job = Job(
                id=entry["id"],
                queue=queue,
                data=entry.get("data"),
                attempts_made=_count(entry, "attempts"),
                created_at=_count(entry, "created_at"),
                function_id=function if isinstance(function, str) else None,
            )
            error = entry.get("error")
            letters.append(
                DeadLetter(
                    job=job,
                    error=error if isinstance(error, str) else "",
                    failed_at=_count(entry, "failed_at"),
                )
            )
        return letters, _count(answer, "total")

    async def redrive(self, queue: str) -> int:
        return _count(await self.bridge.call("iii::queue::redrive", _ref(queue)), "redriven")

    async def _one_message(self, function_id: str, queue: str, message_id: str) -> bool:
        try:
            await self.bridge.call(function_id, {**_ref(queue), "message_id": message_id})
        except IIIError as exc:
            if exc.code == "message_not_found":
                return False
            raise
        return True

    async def redrive_message(self, queue: str, message_id: str) -> bool:
        return await self._one_message("iii::queue::redrive_message", queue, message_id)

    async def discard_message(self, queue: str, message_id: str) -> bool:
        return await self._one_message("iii::queue::discard_message", queue, message_id)


@asynccontextmanager
async def open_adapter(config: Config, hooks: None) -> AsyncIterator[BridgeQueueAdapter]:
    async with open_bridge_link(config.link, name=WORKER_NAME) as bridge:
        yield BridgeQueueAdapter(bridge, config.defaults)
