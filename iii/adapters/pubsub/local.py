"""In-process pub/sub (``modules::pubsub::LocalAdapter``): one engine only.

A published message goes straight to ``on_message`` when the topic has
subscribers here, and is dropped otherwise (as upstream).  No config.

Lifetime: the module's run; no task, no I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs

from iii.adapters.pubsub import MessageHandler

__all__ = ["LocalPubSubAdapter", "open_adapter"]


@attrs.define(eq=False)
class LocalPubSubAdapter:
    on_message: MessageHandler
    topics: set[str] = attrs.field(factory=set)

    async def publish(self, topic: str, data: Any) -> None:
        if topic in self.topics:
            self.on_message(topic, data)

    def subscribe(self, topic: str) -> None:
        self.topics.add(topic)

    def unsubscribe(self, topic: str) -> None:
        self.topics.discard(topic)


@asynccontextmanager
async def open_adapter(
    raw: Any, *, on_message: MessageHandler, where: str
) -> AsyncIterator[LocalPubSubAdapter]:
    yield LocalPubSubAdapter(on_message)
