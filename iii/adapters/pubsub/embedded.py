"""In-process pub/sub (``modules::pubsub::LocalAdapter``, or ``embedded``): one engine only.

A published message goes straight to ``on_message`` when the topic has
subscribers here, and is dropped otherwise (as upstream).  No config keys.

Lifetime: the module's run; no task, no I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs

from iii.adapters.pubsub.base import MessageHandler

__all__ = ["Config", "EmbeddedPubSubAdapter", "open_adapter"]


@attrs.frozen(kw_only=True)
class Config:
    """No keys (upstream's LocalAdapter takes none)."""


@attrs.define(eq=False)
class EmbeddedPubSubAdapter:
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
    config: Config, on_message: MessageHandler
) -> AsyncIterator[EmbeddedPubSubAdapter]:
    yield EmbeddedPubSubAdapter(on_message)
