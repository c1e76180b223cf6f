"""The queue module's functions: intake, inspection and dead-letter handling.

* ``enqueue {topic, data}`` → null (durable on return); ``topic_not_set`` for
  an empty topic, ``enqueue_error`` when the adapter could not store it.
* ``engine::queue::enqueue {queue, function_id, data, messageReceiptId,
  traceparent?, baggage?}`` → ``{messageReceiptId}``; the receipt is the job id.
  ``forbidden`` if the caller's token may not invoke ``function_id``.
* ``engine::queue::list_topics {}`` → ``{topics: [{topic, kind}]}`` with kind
  ``topic`` or ``queue`` (a function queue fed by ``enqueue`` actions).
* ``engine::queue::topic_stats {topic | queue}`` → ``{topic, waiting, delayed,
  active, dlq}``.
* ``engine::queue::dlq_topics {}`` → ``{topics: [{topic, kind, count}]}`` (non-empty DLQs).
* ``engine::queue::dlq_messages {topic | queue, offset?, limit?}`` →
  ``{topic, total, messages: [{id, data, error, failed_at, attempts,
  created_at, function_id?}]}``, oldest first.
* ``iii::queue::redrive {queue | topic}`` → ``{queue, redriven}``.
* ``iii::queue::redrive_message {queue | topic, message_id}`` → ``{queue,
  message_id, redriven: true}``; ``message_not_found`` if it is not in the DLQ.
* ``iii::queue::discard_message {queue | topic, message_id}`` → ``{queue,
  message_id, discarded: true}``; ``message_not_found`` likewise.

``topic`` names a topic; ``queue`` names a function queue when one of that
name exists, else the topic of that name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from iii.errors import IIIError
from iii.modules.queue.names import FUNCTION_QUEUE_PREFIX
from iii.native import CallContext, parse_input

if TYPE_CHECKING:
    from iii.modules.queue import Module

__all__ = ["register_functions"]


@attrs.frozen(kw_only=True)
class EnqueueInput:
    topic: str
    data: Any = None


@attrs.frozen(kw_only=True)
class EnqueueActionInput:
    queue: str | None = None
    function_id: str
    data: Any = None
    messageReceiptId: str | None = None  # noqa: N815 (wire name)
    traceparent: str | None = None
    baggage: str | None = None


@attrs.frozen(kw_only=True)
class QueueRef:
    topic: str | None = None
    queue: str | None = None
    message_id: str | None = None
    offset: int = 0
    limit: int = 50


def register_functions(module: Module) -> None:
    engine = module.engine

    def adapter() -> Any:
        assert module.adapter is not None
        return module.adapter

    async def resolve(ref: QueueRef, function_id: str) -> tuple[str, str]:
        """(adapter queue name, the name shown to users)."""
        if ref.topic:
            return ref.topic, ref.topic
        if ref.queue:
            internal = FUNCTION_QUEUE_PREFIX + ref.queue
            if ref.queue in module.dispatchers or internal in await adapter().list_queues():
                return internal, ref.queue
            return ref.queue, ref.queue
        raise IIIError(
            f"{function_id}: 'queue' or 'topic' is required", code="deserialization_error"
        )

    def describe(name: str) -> dict[str, Any]:
        shown, kind = module.display_name(name)
        return {"topic": shown, "kind": kind}

    async def enqueue(data: Any, ctx: CallContext) -> Any:
        request = parse_input(data, EnqueueInput, "enqueue")
        if not request.topic:
            raise IIIError("Topic is not set", code="topic_not_set")
        job = module.new_job(
            request.topic,
            request.data,
            settings_name=request.topic,
            traceparent=ctx.traceparent,
            baggage=ctx.baggage,
        )
        await module.store(job)
        return None

    async def enqueue_action(data: Any, ctx: CallContext) -> Any:
        request = parse_input(data, EnqueueActionInput, "engine::queue::enqueue")
        if not request.queue:
            raise IIIError("enqueue action needs a queue name", code="enqueue_error")
        if ctx.grant is not None:  # the job will call function_id for the caller
            ctx.grant.require_invoke(request.function_id, what="enqueue a call of")
        job = module.new_job(
            FUNCTION_QUEUE_PREFIX + request.queue,
            request.data,
            settings_name=request.queue,
            job_id=request.messageReceiptId,
            function_id=request.function_id,
            traceparent=request.traceparent or ctx.traceparent,
            baggage=request.baggage or ctx.baggage,
            grant=ctx.grant,
        )
        await module.store(job)
        module.ensure_dispatcher(request.queue)
        return {"messageReceiptId": job.id}

    async def list_topics(data: Any, ctx: CallContext) -> Any:
        names = set(await adapter().list_queues())
        names.update(sub.queue for sub in module.subscriptions.values())
        names.update(sub.queue for sub in module.dispatchers.values())
        return {"topics": [describe(name) for name in sorted(names)]}

    async def topic_stats(data: Any, ctx: CallContext) -> Any:
        ref = parse_input(data, QueueRef, "engine::queue::topic_stats")
        internal, shown = await resolve(ref, "engine::queue::topic_stats")
        stats = await adapter().stats(internal)
        return {
            "topic": shown,
            "waiting": stats.waiting,
            "delayed": stats.delayed,
            "active": stats.active,
            "dlq": stats.dlq,
        }

    async def dlq_topics(data: Any, ctx: CallContext) -> Any:
        topics = []
        for name in sorted(set(await adapter().list_queues())):
            stats = await adapter().stats(name)
            if stats.dlq:
                topics.append({**describe(name), "count": stats.dlq})
        return {"topics": topics}

    async def dlq_messages(data: Any, ctx: CallContext) -> Any:
        ref = parse_input(data, QueueRef, "engine::queue::dlq_messages")
        if ref.offset < 0 or not 0 < ref.limit <= 1000:
            raise IIIError("offset must be >= 0 and limit in 1..1000", code="deserialization_error")
        internal, shown = await resolve(ref, "engine::queue::dlq_messages")
        letters, total = await adapter().dlq_messages(internal, ref.offset, ref.limit)
        messages = []
        for letter in letters:
            entry = {
                "id": letter.job.id,
                "data": letter.job.data,
                "error": letter.error,
                "failed_at": letter.failed_at,
                "attempts": letter.job.attempts_made,
                "created_at": letter.job.created_at,
            }
            if letter.job.function_id is not None:
                entry["function_id"] = letter.job.function_id
            messages.append(entry)
        return {"topic": shown, "total": total, "messages": messages}

    async def redrive(data: Any, ctx: CallContext) -> Any:
        ref = parse_input(data, QueueRef, "iii::queue::redrive")
        internal, shown = await resolve(ref, "iii::queue::redrive")
        count = await adapter().redrive(internal)
        return {"queue": shown, "redriven": count}

    async def redrive_message(data: Any, ctx: CallContext) -> Any:
        ref = parse_input(data, QueueRef, "iii::queue::redrive_message")
        internal, shown = await resolve(ref, "iii::queue::redrive_message")
        if not ref.message_id:
            raise IIIError(
                "iii::queue::redrive_message: 'message_id' is required",
                code="deserialization_error",
            )
        if not await adapter().redrive_message(internal, ref.message_id):
            raise IIIError(
                f"message {ref.message_id} is not in the DLQ of {shown}", code="message_not_found"
            )
        return {"queue": shown, "message_id": ref.message_id, "redriven": True}

    async def discard_message(data: Any, ctx: CallContext) -> Any:
        ref = parse_input(data, QueueRef, "iii::queue::discard_message")
        internal, shown = await resolve(ref, "iii::queue::discard_message")
        if not ref.message_id:
            raise IIIError(
                "iii::queue::discard_message: 'message_id' is required",
                code="deserialization_error",
            )
        if not await adapter().discard_message(internal, ref.message_id):
            raise IIIError(
                f"message {ref.message_id} is not in the DLQ of {shown}", code="message_not_found"
            )
        return {"queue": shown, "message_id": ref.message_id, "discarded": True}

    functions = {
        "enqueue": (enqueue, "Enqueue a job for the queue triggers of a topic"),
        "engine::queue::enqueue": (
            enqueue_action,
            "Enqueue a call to a function (invokefunction enqueue action)",
        ),
        "engine::queue::list_topics": (list_topics, "List queue topics"),
        "engine::queue::topic_stats": (topic_stats, "Job counts of a topic"),
        "engine::queue::dlq_topics": (dlq_topics, "Topics with dead-lettered jobs"),
        "engine::queue::dlq_messages": (dlq_messages, "Dead-lettered jobs of a topic"),
        "iii::queue::redrive": (redrive, "Move every dead-lettered job of a queue back"),
        "iii::queue::redrive_message": (redrive_message, "Move one dead-lettered job back"),
        "iii::queue::discard_message": (discard_message, "Delete one dead-lettered job"),
    }
    for function_id, (handler, description) in functions.items():
        engine.register_function(function_id, handler, description=description)
