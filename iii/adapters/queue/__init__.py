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
from iii.adapters.queue import embedded
from iii.adapters.queue.base import (
    BackendConfig,
    BridgeQueueConfig,
    DeadLetter,
    Delivery,
    Job,
    QueueAdapter,
    QueueConsumer,
    QueueDefaults,
    QueueStats,
    RabbitQueueConfig,
    RedisQueueConfig,
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


# The embedded backend is imported with the package; the others only when a
# config chooses them (their config classes live apart, in iii.adapters.settings
# or the queue's base.py, so loading a config does not import them).  Each
# opener is typed: mypy holds the backend's factory to its config class and
# what it yields to the Protocol.
def _open_redis(config: RedisQueueConfig, hooks: None) -> AbstractAsyncContextManager[QueueAdapter]:
    from iii.adapters.queue import redis

    return redis.open_adapter(config, hooks)


def _open_rabbitmq(
    config: RabbitQueueConfig, hooks: None
) -> AbstractAsyncContextManager[QueueAdapter]:
    from iii.adapters.queue import rabbitmq

    return rabbitmq.open_adapter(config, hooks)


def _open_bridge(
    config: BridgeQueueConfig, hooks: None
) -> AbstractAsyncContextManager[QueueAdapter]:
    from iii.adapters.queue import bridge

    return bridge.open_adapter(config, hooks)


BACKENDS: dict[str, Backend[Any, None, QueueAdapter]] = {
    DEFAULT_ADAPTER: backend(embedded.Config, embedded.open_adapter),
    "modules::queue::RedisAdapter": backend(RedisQueueConfig, _open_redis),
    "modules::queue::RabbitMQAdapter": backend(RabbitQueueConfig, _open_rabbitmq),
    "modules::queue::adapters::Bridge": backend(BridgeQueueConfig, _open_bridge),
}


class QueueAdapterRef(AdapterRef):
    """The queue module's ``adapter`` block."""

    KIND = adapter_kind("queue", BACKENDS, DEFAULT_ADAPTER)


def open_queue_adapter(
    ref: QueueAdapterRef | None = None,
) -> AbstractAsyncContextManager[QueueAdapter]:
    return open_backend(BACKENDS, ref or QueueAdapterRef.default(), None)
