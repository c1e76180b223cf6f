"""PubSub adapters: how ``publish`` reaches the ``subscribe`` triggers.

:class:`PubSubAdapter` is what the pubsub module needs; :func:`open_pubsub_adapter`
maps upstream's class names (spec modules.md §6) to a backend here:

==================================  =====================================================
``modules::pubsub::LocalAdapter``   :mod:`.embedded` (default; also ``embedded``):
                                    in-process, this engine only
``modules::pubsub::RedisAdapter``   :mod:`.redis` (``redis_url``): every engine on the
                                    same Redis and prefix
==================================  =====================================================

The module tells the adapter which topics have subscribers here
(:meth:`~PubSubAdapter.subscribe` / :meth:`~PubSubAdapter.unsubscribe`, once per
topic) and receives every message of those topics through its hooks,
``on_message(topic, data)``; it then runs every trigger of the topic.  Fan-out
to the triggers is the module's job, so every subscriber gets every message
on every backend.

Lifetime: :func:`open_pubsub_adapter` returns the backend's context manager;
the module keeps it open for its whole run.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from iii.adapters import Backend, adapter_kind, backend, open_backend
from iii.adapters.pubsub import embedded
from iii.adapters.pubsub.base import MessageHandler, PubSubAdapter
from iii.adapters.settings import RedisSettings
from iii.config_schema import AdapterRef

__all__ = [
    "PubSubAdapter",
    "PubSubAdapterRef",
    "open_pubsub_adapter",
    "BACKENDS",
    "DEFAULT_CLASS",
    "MessageHandler",
]

DEFAULT_CLASS = "modules::pubsub::LocalAdapter"


# The embedded backend is imported with the package; the others only when a
# config chooses them (their config classes live apart, in iii.adapters.settings
# or the queue's base.py, so loading a config does not import them).  Each
# opener is typed: mypy holds the backend's factory to its config class and
# what it yields to the Protocol.
def _open_redis(
    config: RedisSettings, hooks: MessageHandler
) -> AbstractAsyncContextManager[PubSubAdapter]:
    from iii.adapters.pubsub import redis

    return redis.open_adapter(config, hooks)


BACKENDS: dict[str, Backend[Any, MessageHandler, PubSubAdapter]] = {
    DEFAULT_CLASS: backend(embedded.Config, embedded.open_adapter),
    "modules::pubsub::RedisAdapter": backend(RedisSettings, _open_redis),
}


class PubSubAdapterRef(AdapterRef):
    """The pubsub module's ``adapter`` block."""

    KIND = adapter_kind("pubsub", BACKENDS, DEFAULT_CLASS)


def open_pubsub_adapter(
    ref: PubSubAdapterRef | None, on_message: MessageHandler
) -> AbstractAsyncContextManager[PubSubAdapter]:
    return open_backend(BACKENDS, ref or PubSubAdapterRef.default(), on_message)
