"""PubSub adapters: how ``publish`` reaches the ``subscribe`` triggers.

:class:`PubSubAdapter` is what the pubsub module needs; :func:`open_pubsub_adapter`
maps upstream's class names (spec modules.md §6) to a backend here:

==================================  =====================================================
``modules::pubsub::LocalAdapter``   :mod:`.local` (default): in-process, this engine only
``modules::pubsub::RedisAdapter``   :mod:`.redis` (``redis_url``): every engine on the
                                    same Redis and prefix
==================================  =====================================================

The module tells the adapter which topics have subscribers here
(:meth:`~PubSubAdapter.subscribe` / :meth:`~PubSubAdapter.unsubscribe`, once per
topic) and receives every message of those topics through ``on_message(topic,
data)``; it then runs every trigger of the topic.  Fan-out to the triggers is
the module's job, so every subscriber gets every message on every backend.

Lifetime: :func:`open_pubsub_adapter` returns the backend's context manager;
the module keeps it open for its whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, cast

from iii.adapters import import_backend
from iii.config import AdapterRef

__all__ = ["PubSubAdapter", "open_pubsub_adapter", "BACKENDS", "DEFAULT_CLASS", "MessageHandler"]

DEFAULT_CLASS = "modules::pubsub::LocalAdapter"
BACKENDS = {
    "modules::pubsub::LocalAdapter": "iii.adapters.pubsub.local",
    "modules::pubsub::RedisAdapter": "iii.adapters.pubsub.redis",
}

MessageHandler = Callable[[str, Any], None]


class PubSubAdapter(Protocol):
    async def publish(self, topic: str, data: Any) -> None: ...

    def subscribe(self, topic: str) -> None:
        """Start delivering ``topic`` to ``on_message`` (idempotent)."""

    def unsubscribe(self, topic: str) -> None:
        """Stop delivering ``topic``."""


def open_pubsub_adapter(
    ref: AdapterRef | None, *, on_message: MessageHandler, where: str = "pubsub.adapter"
) -> AbstractAsyncContextManager[PubSubAdapter]:
    backend, raw = import_backend("pubsub", BACKENDS, ref, DEFAULT_CLASS, key=f"{where}.class")
    return cast(
        "AbstractAsyncContextManager[PubSubAdapter]",
        backend.open_adapter(raw, on_message=on_message, where=where),
    )
