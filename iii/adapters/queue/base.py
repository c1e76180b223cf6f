"""What the queue module needs from a backend (the :class:`QueueAdapter` and
:class:`QueueConsumer` protocols), the value types they share,
:class:`BackendConfig` (the keys every queue backend reads), and the configs
of the backends imported only when a config chooses them (Redis, RabbitMQ,
Bridge: see :mod:`iii.adapters.settings`).

Backends import this, never the package ``__init__`` (which imports them).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import attrs

from iii.adapters.settings import (
    DEFAULT_BRIDGE_URL,
    DEFAULT_REDIS_URL,
    LINK_KEYS,
    TOKEN_CHECK,
    URL_CHECK,
    LinkSettings,
)
from iii.config_schema import Count

__all__ = [
    "BackendConfig",
    "RedisQueueConfig",
    "RabbitQueueConfig",
    "BridgeQueueConfig",
    "DeadLetter",
    "Delivery",
    "Job",
    "QueueAdapter",
    "QueueConsumer",
    "QueueDefaults",
    "QueueMode",
    "QueueStats",
]

QueueMode = Literal["concurrent", "standard", "fifo"]


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
        failed_at = raw.get(
            "failed_at", raw.get("exhausted_at", 0)
        )  # upstream RabbitMQ writes exhausted_at
        return cls(
            job=Job.from_json(raw["job"]),
            error=str(raw.get("error", "")),
            failed_at=int(failed_at or 0),
        )


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


@attrs.frozen(kw_only=True)
class BackendConfig:
    """The keys every queue backend reads (upstream's names); a backend's
    ``Config`` adds its own."""

    max_attempts: Count = Count(3)
    backoff_ms: Count = Count(1000)
    concurrency: Count = Count(10)
    poll_interval_ms: Count = Count(100)
    mode: QueueMode = "concurrent"
    visibility_timeout_ms: Count = Count(30_000)

    @property
    def defaults(self) -> QueueDefaults:
        return QueueDefaults(
            max_attempts=self.max_attempts,
            backoff_ms=self.backoff_ms,
            concurrency=self.concurrency,
            poll_interval_ms=self.poll_interval_ms,
            fifo=self.mode == "fifo",
            visibility_timeout_ms=self.visibility_timeout_ms,
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

    def open_consumer(
        self, queue: str, name: str, prefetch: int
    ) -> AbstractAsyncContextManager[QueueConsumer]:
        """A consumer of ``queue``; ``prefetch`` bounds what it holds at once."""
        ...

    async def list_queues(self) -> list[str]: ...

    async def stats(self, queue: str) -> QueueStats: ...

    async def dlq_messages(
        self, queue: str, offset: int, limit: int
    ) -> tuple[list[DeadLetter], int]:
        """A page of the DLQ (oldest first) and its total size."""
        ...

    async def redrive(self, queue: str) -> int:
        """Move every DLQ message back to the queue (attempts reset); how many moved."""
        ...

    async def redrive_message(self, queue: str, message_id: str) -> bool: ...

    async def discard_message(self, queue: str, message_id: str) -> bool: ...


# -- the configs of the queue backends imported only when chosen (see iii.adapters.settings)


@attrs.frozen(kw_only=True)
class RedisQueueConfig(BackendConfig):
    """``modules::queue::RedisAdapter``: the keys of every queue backend, and Redis's."""

    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = "iii:queue:"


@attrs.frozen(kw_only=True)
class RabbitQueueConfig(BackendConfig):
    """``modules::queue::RabbitMQAdapter``: the keys of every queue backend,
    ``amqp_url``, and upstream's names for two of them: ``prefetch_count``
    (concurrency) and ``queue_mode`` (mode), used when ours is at its default."""

    amqp_url: str = "amqp://localhost:5672"
    prefetch_count: Count | None = None
    queue_mode: QueueMode | None = None

    @property
    def defaults(self) -> QueueDefaults:
        given = attrs.fields_dict(BackendConfig)
        concurrency = self.concurrency
        if self.prefetch_count is not None and concurrency == given["concurrency"].default:
            concurrency = self.prefetch_count
        mode = self.mode
        if self.queue_mode is not None and mode == given["mode"].default:
            mode = self.queue_mode
        return attrs.evolve(super().defaults, concurrency=concurrency, fifo=mode == "fifo")


@attrs.frozen(kw_only=True)
class BridgeQueueConfig(BackendConfig):
    """``modules::queue::adapters::Bridge``: the keys of every queue backend, and
    the link's (as :class:`LinkSettings`; attrs' slotted classes cannot have
    both as bases)."""

    bridge_url: str = attrs.field(default=DEFAULT_BRIDGE_URL, validator=URL_CHECK)
    token: str | None = attrs.field(default=None, repr=False, validator=TOKEN_CHECK)
    ca_file: str | None = None
    call_timeout_ms: Count = Count(30_000)

    @property
    def link(self) -> LinkSettings:
        return LinkSettings(**{key: getattr(self, key) for key in LINK_KEYS})
