"""Queue adapters: durable job storage with leases, delayed retries and a dead-letter queue.

What the queue module needs from a backend (the :class:`QueueAdapter` and
:class:`QueueConsumer` protocols), and the shared value types.  Delivery is
**at least once** on every backend:

* :meth:`QueueAdapter.enqueue` returns only when the job is durable (on disk,
  in Redis, or confirmed by RabbitMQ);
* a received job is *leased* to its consumer until it is acked, retried or
  dead-lettered; if the consumer's engine dies, the job is delivered again
  (after ``visibility_timeout`` on Redis, at restart on the builtin file
  store, when the connection drops on RabbitMQ);
* :meth:`QueueConsumer.retry` re-schedules a job after a delay, and
  :meth:`QueueConsumer.dead_letter` moves it to the queue's DLQ, from where the
  redrive functions bring it back.

Retry counting, backoff, conditions, concurrency and FIFO groups live in the
module, once for every backend.

Backends, looked up by upstream class name and imported lazily:

* ``modules::queue::BuiltinQueueAdapter`` (default): :mod:`.builtin`, in memory
  or on an fsync'd record log (``store_method: file_based``);
* ``modules::queue::RedisAdapter``: :mod:`.redis`, Redis Streams with a
  consumer group;
* ``modules::queue::RabbitMQAdapter``: :mod:`.rabbitmq`, AMQP 0-9-1 over trio;
* ``modules::queue::adapters::Bridge``: :mod:`.bridge`, the jobs kept by
  another iii engine's queue module and run here (at least once across a
  link drop; retries and the DLQ are the remote's).

Lifetime: :func:`open_queue_adapter` owns the backend for the module's run;
each consumer lives in :meth:`QueueAdapter.open_consumer`'s block.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import attrs

from iii.adapters import import_backend
from iii.config import AdapterRef
from iii.errors import ConfigError

__all__ = [
    "Job",
    "Delivery",
    "DeadLetter",
    "QueueStats",
    "QueueDefaults",
    "QueueAdapter",
    "QueueConsumer",
    "open_queue_adapter",
    "BACKENDS",
    "DEFAULT_ADAPTER",
    "read_defaults",
]

DEFAULT_ADAPTER = "modules::queue::BuiltinQueueAdapter"

BACKENDS = {
    "modules::queue::BuiltinQueueAdapter": "iii.adapters.queue.builtin",
    "modules::queue::RedisAdapter": "iii.adapters.queue.redis",
    "modules::queue::RabbitMQAdapter": "iii.adapters.queue.rabbitmq",
    "modules::queue::adapters::Bridge": "iii.adapters.queue.bridge",
}


@attrs.frozen(kw_only=True)
class Job:
    """One message; its JSON form is what every backend stores."""

    id: str
    queue: str
    data: Any
    attempts_made: int = 0
    max_attempts: int = 3
    backoff_ms: int = 1000
    created_at: int = 0  # ms since the epoch
    # Set for jobs from ``invokefunction`` with an ``enqueue`` action: the
    # function to call.  Topic jobs (``enqueue {topic, data}``) go to triggers.
    function_id: str | None = None
    traceparent: str | None = None
    baggage: str | None = None
    # The name of the restricted token that enqueued a function job: the job's
    # call is made under that token's grant (iii.grants).
    grant: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "queue": self.queue,
            "data": self.data,
            "attempts_made": self.attempts_made,
            "max_attempts": self.max_attempts,
            "backoff_ms": self.backoff_ms,
            "created_at": self.created_at,
        }
        for key in ("function_id", "traceparent", "baggage", "grant"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        return cls(
            id=str(raw["id"]),
            queue=str(raw["queue"]),
            data=raw.get("data"),
            attempts_made=int(raw.get("attempts_made", 0)),
            max_attempts=int(raw.get("max_attempts", 3)),
            backoff_ms=int(raw.get("backoff_ms", 1000)),
            created_at=int(raw.get("created_at", 0)),
            function_id=raw.get("function_id"),
            traceparent=raw.get("traceparent"),
            baggage=raw.get("baggage"),
            grant=raw.get("grant") if isinstance(raw.get("grant"), str) else None,
        )


@attrs.define(eq=False)
class Delivery:
    """A job leased to a consumer; ``handle`` is the backend's receipt."""

    job: Job
    handle: Any = None


@attrs.frozen(kw_only=True)
class DeadLetter:
    job: Job
    error: str
    failed_at: int  # ms

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job.to_json(), "error": self.error, "failed_at": self.failed_at}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DeadLetter:
        failed_at = raw.get("failed_at", raw.get("exhausted_at", 0))  # upstream RabbitMQ writes exhausted_at
        return cls(job=Job.from_json(raw["job"]), error=str(raw.get("error", "")), failed_at=int(failed_at or 0))


@attrs.frozen(kw_only=True)
class QueueStats:
    queue: str
    waiting: int = 0
    delayed: int = 0
    active: int = 0
    dlq: int = 0


@attrs.frozen(kw_only=True)
class QueueDefaults:
    """Settings every backend reads from its config (upstream key names)."""

    max_attempts: int = 3
    backoff_ms: int = 1000
    concurrency: int = 10
    poll_interval_ms: int = 100
    fifo: bool = False
    visibility_timeout_ms: int = 30_000

    @property
    def poll_interval(self) -> float:
        return self.poll_interval_ms / 1000

    @property
    def visibility_timeout(self) -> float:
        return self.visibility_timeout_ms / 1000


def _positive_int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"must be a positive integer, got {value!r}", key=f"adapter.config.{key}")
    return value


def read_defaults(config: dict[str, Any], *, concurrency_key: str = "concurrency", mode_key: str = "mode") -> QueueDefaults:
    mode = config.get(mode_key, "concurrent")
    if mode not in ("concurrent", "standard", "fifo"):
        raise ConfigError(f"must be 'concurrent' or 'fifo', got {mode!r}", key=f"adapter.config.{mode_key}")
    return QueueDefaults(
        max_attempts=_positive_int(config, "max_attempts", 3),
        backoff_ms=_positive_int(config, "backoff_ms", 1000),
        concurrency=_positive_int(config, concurrency_key, 10),
        poll_interval_ms=_positive_int(config, "poll_interval_ms", 100),
        fifo=mode == "fifo",
        visibility_timeout_ms=_positive_int(config, "visibility_timeout_ms", 30_000),
    )


class QueueConsumer(Protocol):
    """One consumer of one queue; it holds leases on what it received."""

    async def receive(self, timeout: float) -> Delivery | None:
        """The next ready job, leased to this consumer; None after ``timeout``."""
        ...

    async def ack(self, delivery: Delivery) -> None:
        """Done: the job is gone."""
        ...

    async def retry(self, delivery: Delivery, job: Job, delay: float) -> None:
        """Replace the leased job by ``job`` (its attempts counted), ready after ``delay`` s."""
        ...

    async def dead_letter(self, delivery: Delivery, job: Job, error: str) -> None:
        """Move the job to the queue's dead-letter queue."""
        ...

    async def release(self, delivery: Delivery) -> None:
        """Give the job back unprocessed (ready again now, attempts unchanged)."""
        ...

    async def extend(self, deliveries: list[Delivery]) -> None:
        """Renew the leases of jobs still being processed."""
        ...


class QueueAdapter(Protocol):
    defaults: QueueDefaults

    async def enqueue(self, job: Job) -> None:
        """Store ``job``; durable when this returns."""
        ...

    def open_consumer(self, queue: str, name: str, prefetch: int) -> AbstractAsyncContextManager[QueueConsumer]:
        """A consumer of ``queue``; ``prefetch`` bounds what it holds at once."""
        ...

    async def list_queues(self) -> list[str]: ...

    async def stats(self, queue: str) -> QueueStats: ...

    async def dlq_messages(self, queue: str, offset: int, limit: int) -> tuple[list[DeadLetter], int]:
        """A page of the DLQ (oldest first) and its total size."""
        ...

    async def redrive(self, queue: str) -> int:
        """Move every DLQ message back to the queue (attempts reset); how many moved."""
        ...

    async def redrive_message(self, queue: str, message_id: str) -> bool: ...

    async def discard_message(self, queue: str, message_id: str) -> bool: ...


@asynccontextmanager
async def open_queue_adapter(ref: AdapterRef | None) -> AsyncIterator[QueueAdapter]:
    backend, raw = import_backend("queue", BACKENDS, ref, DEFAULT_ADAPTER, key="adapter.class")
    config: Any = raw or {}
    if not isinstance(config, dict):
        raise ConfigError("adapter config must be a mapping", key="adapter.config")
    async with backend.open_adapter(config) as adapter:
        yield adapter
