"""What the pubsub module needs from a backend (:class:`PubSubAdapter`), and the
callback a backend delivers messages to (:data:`MessageHandler`, its hooks).

Backends import this, never the package ``__init__`` (which imports them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["PubSubAdapter", "MessageHandler"]

# on_message(topic, data): a message of a topic that has subscribers here.
MessageHandler = Callable[[str, Any], None]


class PubSubAdapter(Protocol):
    async def publish(self, topic: str, data: Any) -> None: ...

    def subscribe(self, topic: str) -> None:
        """Start delivering ``topic`` to ``on_message`` (idempotent)."""

    def unsubscribe(self, topic: str) -> None:
        """Stop delivering ``topic``."""
