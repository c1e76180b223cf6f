"""Pub/sub over Redis (``modules::pubsub::RedisAdapter``): every engine on one Redis.

Channel = ``P <topic>`` (``P`` is the ``key_prefix``, empty by default, so the
channel is the raw topic as upstream); payload = the JSON of the published
data.  Each engine SUBSCRIBEs once per topic that has triggers on it and fans
each message out to all of them (upstream kept only the first trigger of a
topic, and unsubscribing one dropped the topic for all).  A message published
through this engine also comes back through Redis, so local subscribers get
it exactly once, like remote ones.

Redis pub/sub keeps nothing: a message published while an engine's
subscription is down (outage, reconnect) does not reach that engine.
``publish`` during an outage fails with ``adapter_unavailable``.  Config:
``redis_url``, ``key_prefix``, ``timeout_ms``.

Lifetime: :func:`open_adapter` owns the client and the subscriber tasks (in a
nursery of its own) until the module leaves its block.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio

from iii import json_limits
from iii.adapters.pubsub.base import MessageHandler
from iii.adapters.redis_support import RedisChannels, RedisConnection, RedisSettings, open_redis

__all__ = ["Config", "RedisPubSubAdapter", "open_adapter"]

# redis_url, key_prefix, timeout_ms
Config = RedisSettings

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class RedisPubSubAdapter:
    connection: RedisConnection
    channels: RedisChannels

    async def publish(self, topic: str, data: Any) -> None:
        channel = self.connection.key(topic)
        payload = orjson.dumps(data)
        await self.connection.call(
            f"PUBLISH {channel}", lambda: self.connection.client.publish(channel, payload)
        )

    def subscribe(self, topic: str) -> None:
        self.channels.want(self.connection.key(topic))

    def unsubscribe(self, topic: str) -> None:
        self.channels.drop(self.connection.key(topic))


@asynccontextmanager
async def open_adapter(
    settings: Config, on_message: MessageHandler
) -> AsyncIterator[RedisPubSubAdapter]:
    prefix = settings.key_prefix

    def received(channel: bytes, payload: bytes) -> None:
        topic = channel.decode()[len(prefix) :]
        try:
            data = json_limits.loads(payload)
        except orjson.JSONDecodeError:  # (also JsonTooDeepError)
            log.warning("pubsub: a message on %s is not JSON; dropped", topic)
            return
        on_message(topic, data)

    async with open_redis(settings, name="pubsub redis adapter") as connection:
        channels = RedisChannels(connection, received)
        async with trio.open_nursery() as adapter_nursery:
            await channels.start(adapter_nursery)
            try:
                yield RedisPubSubAdapter(connection, channels)
            finally:
                adapter_nursery.cancel_scope.cancel()
