"""State on Redis (``modules::state::adapters::RedisAdapter``).

Keys (``P`` is the adapter's ``key_prefix``, empty by default):

* ``P state:<scope>``: a hash, field = key, value = the JSON text (upstream's
  layout, spec modules.md §5);
* ``P iii:state:scopes``: a set of the scopes holding at least one key
  (``state::list_groups`` reads it instead of SCANning the keyspace; a scope
  leaves it when its last key is deleted);
* channel ``P state::events``: every write's state event, for the state
  triggers of the other engines on the same Redis and prefix.

set and delete are single Lua scripts (atomic, returning the old value);
update is read → ops in Python → compare-and-set script, retried on a lost
race (:class:`~iii.adapters.redis_support.JsonHashes`).  Config:
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
from iii.adapters.state.base import PeerEventHandler
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["Config", "RedisStateAdapter", "open_adapter"]

# redis_url, key_prefix, timeout_ms
Config = RedisSettings


@attrs.define(eq=False)
class RedisStateAdapter:
    connection: RedisConnection
    hashes: JsonHashes
    peers: PeerEvents

    def _hash(self, scope: str) -> str:
        return self.connection.key("state:", scope)

    def _chain(self, scope: str) -> builtins.list[tuple[str, str]]:
        return [(self.connection.key("iii:state:scopes"), scope)]

    async def get(self, scope: str, key: str) -> Any:
        return await self.hashes.get(self._hash(scope), key)

    async def set(self, scope: str, key: str, value: Any, limits: WriteLimits = NO_LIMITS) -> Any:
        return await self.hashes.set(self._hash(scope), key, value, self._chain(scope), limits)

    async def delete(self, scope: str, key: str, limits: WriteLimits = NO_LIMITS) -> Any:
        return await self.hashes.delete(self._hash(scope), key, self._chain(scope), limits)

    async def update(
        self, scope: str, key: str, ops: builtins.list[UpdateOp], limits: WriteLimits = NO_LIMITS
    ) -> UpdateResult:
        result: UpdateResult = await self.hashes.update(
            self._hash(scope), key, ops, self._chain(scope), limits
        )
        return result

    async def list(self, scope: str) -> builtins.list[Any]:
        return await self.hashes.values(self._hash(scope))

    async def list_groups(self) -> builtins.list[str]:
        return await self.hashes.members(self.connection.key("iii:state:scopes"))

    async def publish_event(self, event: dict[str, Any]) -> None:
        await self.peers.publish(event)


@asynccontextmanager
async def open_adapter(
    config: Config, on_peer_event: PeerEventHandler
) -> AsyncIterator[RedisStateAdapter]:
    async with open_json_store(
        config,
        name="state redis adapter",
        events="state::events",
        on_peer_event=on_peer_event,
    ) as (connection, hashes, peers):
        yield RedisStateAdapter(connection, hashes, peers)
