"""Streams on Redis (``modules::stream::adapters::RedisAdapter``).

Keys (``P`` is the adapter's ``key_prefix``, empty by default):

* ``P stream:<stream>:<group>``: a hash, field = item id, value = the JSON
  text (upstream's layout, spec modules.md §4.4; as upstream, a ``:`` inside
  a stream name can make two groups share a hash);
* ``P iii:stream:groups:<stream>``: a set of the stream's groups holding at
  least one item;
* ``P iii:streams``: a set of the streams holding at least one group
  (``list_groups``/``list_all`` read the sets instead of KEYS/SCAN over the
  keyspace);
* channel ``P stream::events``: every stream message (create/update/delete/
  event), as ``{"origin", "event"}``, for the clients and stream triggers of
  the other engines on the same Redis and prefix.

set and delete are single Lua scripts (atomic, returning the old value, and
keeping the sets right); update is read → ops in Python → compare-and-set
script (:class:`~iii.adapters.redis_support.JsonHashes`).  Config:
``redis_url``, ``key_prefix``, ``timeout_ms``.

Lifetime: :func:`open_adapter` owns the client and the peer-event subscriber
(:func:`~iii.adapters.redis_support.open_json_store`) until the module leaves
its block.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs

from iii.adapters.limits import NO_LIMITS, WriteLimits
from iii.adapters.redis_support import (
    JsonHashes,
    PeerEvents,
    RedisConnection,
    RedisSettings,
    open_json_store,
)
from iii.adapters.stream.base import PeerEventHandler
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["Config", "RedisStreamAdapter", "open_adapter"]

# redis_url, key_prefix, timeout_ms
Config = RedisSettings


@attrs.define(eq=False)
class RedisStreamAdapter:
    connection: RedisConnection
    hashes: JsonHashes
    peers: PeerEvents

    def _hash(self, stream: str, group: str) -> str:
        return self.connection.key("stream:", stream, ":", group)

    def _chain(self, stream: str, group: str) -> builtins.list[tuple[str, str]]:
        return [
            (self.connection.key("iii:stream:groups:", stream), group),
            (self.connection.key("iii:streams"), stream),
        ]

    async def get(self, stream: str, group: str, item: str) -> Any:
        return await self.hashes.get(self._hash(stream, group), item)

    async def set(
        self, stream: str, group: str, item: str, value: Any, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        return await self.hashes.set(
            self._hash(stream, group), item, value, self._chain(stream, group), limits
        )

    async def delete(
        self, stream: str, group: str, item: str, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        return await self.hashes.delete(
            self._hash(stream, group), item, self._chain(stream, group), limits
        )

    async def update(
        self,
        stream: str,
        group: str,
        item: str,
        ops: builtins.list[UpdateOp],
        limits: WriteLimits = NO_LIMITS,
    ) -> UpdateResult:
        result: UpdateResult = await self.hashes.update(
            self._hash(stream, group), item, ops, self._chain(stream, group), limits
        )
        return result

    async def list(self, stream: str, group: str) -> builtins.list[Any]:
        return await self.hashes.values(self._hash(stream, group))

    async def list_groups(self, stream: str) -> builtins.list[str]:
        return await self.hashes.members(self.connection.key("iii:stream:groups:", stream))

    async def list_all(self) -> builtins.list[tuple[str, builtins.list[str]]]:
        return [
            (name, await self.list_groups(name))
            for name in await self.hashes.members(self.connection.key("iii:streams"))
        ]

    async def publish_event(self, message: dict[str, Any]) -> None:
        await self.peers.publish(message)


@asynccontextmanager
async def open_adapter(
    config: Config, on_peer_event: PeerEventHandler
) -> AsyncIterator[RedisStreamAdapter]:
    async with open_json_store(
        config,
        name="stream redis adapter",
        events="stream::events",
        on_peer_event=on_peer_event,
    ) as (connection, hashes, peers):
        yield RedisStreamAdapter(connection, hashes, peers)
