"""State on the embedded key-value store (``modules::state::adapters::KvStore``, or ``embedded``).

index = scope, key = key (spec modules.md §5).  Config: ``store_method``,
``file_path``, ``save_interval_ms`` (:mod:`iii.adapters.kvstore`).  One
engine only, so there are no peer events.

Lifetime: :func:`open_adapter` owns the store (its log and compaction task)
for the module's run.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs

from iii.adapters.kvstore import KvStore, KvStoreConfig, open_kv_store
from iii.adapters.limits import NO_LIMITS, WriteLimits
from iii.adapters.state.base import PeerEventHandler
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["Config", "EmbeddedStateAdapter", "open_adapter"]

# store_method, file_path, save_interval_ms
Config = KvStoreConfig


@attrs.define(eq=False)
class EmbeddedStateAdapter:
    store: KvStore

    async def get(self, scope: str, key: str) -> Any:
        return await self.store.get(scope, key)

    async def set(self, scope: str, key: str, value: Any, limits: WriteLimits = NO_LIMITS) -> Any:
        return await self.store.set(scope, key, value, limits)

    async def delete(self, scope: str, key: str, limits: WriteLimits = NO_LIMITS) -> Any:
        return await self.store.delete(scope, key, limits)

    async def update(
        self, scope: str, key: str, ops: builtins.list[UpdateOp], limits: WriteLimits = NO_LIMITS
    ) -> UpdateResult:
        return await self.store.update(scope, key, ops, limits)

    async def list(self, scope: str) -> builtins.list[Any]:
        return await self.store.list(scope)

    async def list_groups(self) -> builtins.list[str]:
        return sorted(await self.store.list_indexes())

    async def publish_event(self, event: dict[str, Any]) -> None:
        return None


@asynccontextmanager
async def open_adapter(
    config: Config, on_peer_event: PeerEventHandler
) -> AsyncIterator[EmbeddedStateAdapter]:
    async with open_kv_store(config) as store:
        yield EmbeddedStateAdapter(store)
