"""Queue adapters: durable job storage with leases, delayed retries and a dead-letter queue.

What the queue module needs from a backend (the :class:`QueueAdapter` and
:class:`QueueConsumer` protocols, in :mod:`.base`), and the shared value types.  Delivery is
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

Backends, looked up by upstream class name (see :mod:`iii.adapters` for the
shape every kind shares; the backends call nothing back, ``hooks`` is None):

* ``modules::queue::BuiltinQueueAdapter`` (default, or ``embedded``):
  :mod:`.embedded`, in memory or on an fsync'd record log
  (``store_method: file_based``);
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

from contextlib import AbstractAsyncContextManager
from typing import Any

from iii.adapters import Backend, adapter_kind, backend, open_backend
from iii.adapters.queue import bridge, embedded, rabbitmq, redis
from iii.adapters.queue.base import (
    BackendConfig,
    DeadLetter,
    Delivery,
    Job,
    QueueAdapter,
    QueueConsumer,
    QueueDefaults,
    QueueStats,
)
from iii.config_schema import AdapterRef

__all__ = [
    "Job",
    "Delivery",
    "DeadLetter",
    "QueueStats",
    "QueueDefaults",
    "QueueAdapter",
    "QueueAdapterRef",
    "QueueConsumer",
    "BackendConfig",
    "open_queue_adapter",
    "BACKENDS",
    "DEFAULT_ADAPTER",
]

DEFAULT_ADAPTER = "modules::queue::BuiltinQueueAdapter"

BACKENDS: dict[str, Backend[Any, None, QueueAdapter]] = {
    DEFAULT_ADAPTER: backend(embedded.Config, embedded.open_adapter),
    "modules::queue::RedisAdapter": backend(redis.Config, redis.open_adapter),
    "modules::queue::RabbitMQAdapter": backend(rabbitmq.Config, rabbitmq.open_adapter),
    "modules::queue::adapters::Bridge": backend(bridge.Config, bridge.open_adapter),
}


class QueueAdapterRef(AdapterRef):
    """The queue module's ``adapter`` block."""

    KIND = adapter_kind("queue", BACKENDS, DEFAULT_ADAPTER)


def open_queue_adapter(
    ref: QueueAdapterRef | None = None,
) -> AbstractAsyncContextManager[QueueAdapter]:
    return open_backend(BACKENDS, ref or QueueAdapterRef.default(), None)
