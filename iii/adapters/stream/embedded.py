"""Streams on the embedded key-value store (``modules::stream::adapters::KvStore``, or ``embedded``).

One store index per group, named by the JSON array ``["<stream>","<group>"]``
(upstream used ``stream:<stream>:<group>``, which a ``:`` inside a name made
ambiguous); key = item id.  Config: ``store_method``, ``file_path``,
``save_interval_ms`` (:mod:`iii.adapters.kvstore`); upstream's
``channel_size`` is accepted and ignored (delivery to clients has its own
per-connection queues).  One engine only, so there are no peer events.

Lifetime: :func:`open_adapter` owns the store (its log and compaction task)
for the module's run.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson

from iii.adapters.kvstore import KvStore, KvStoreConfig, open_kv_store
from iii.adapters.limits import NO_LIMITS, WriteLimits
from iii.adapters.stream.base import PeerEventHandler
from iii.config_schema import Count
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["Config", "EmbeddedStreamAdapter", "open_adapter"]


@attrs.frozen(kw_only=True)
class Config(KvStoreConfig):
    """The embedded store's keys, and upstream's ``channel_size`` (accepted, unused)."""

    channel_size: Count = Count(256)


def _index(stream: str, group: str) -> str:
    return orjson.dumps([stream, group]).decode()


def _split(index: str) -> tuple[str, str] | None:
    try:
        stream, group = orjson.loads(index)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return stream, group


@attrs.define(eq=False)
class EmbeddedStreamAdapter:
    store: KvStore

    async def get(self, stream: str, group: str, item: str) -> Any:
        return await self.store.get(_index(stream, group), item)

    async def set(
        self, stream: str, group: str, item: str, value: Any, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        return await self.store.set(_index(stream, group), item, value, limits)

    async def delete(
        self, stream: str, group: str, item: str, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        return await self.store.delete(_index(stream, group), item, limits)

    async def update(
        self,
        stream: str,
        group: str,
        item: str,
        ops: builtins.list[UpdateOp],
        limits: WriteLimits = NO_LIMITS,
    ) -> UpdateResult:
        return await self.store.update(_index(stream, group), item, ops, limits)

    async def list(self, stream: str, group: str) -> builtins.list[Any]:
        return await self.store.list(_index(stream, group))

    async def _groups(self) -> dict[str, builtins.list[str]]:
        streams: dict[str, builtins.list[str]] = {}
        for index in await self.store.list_indexes():
            parts = _split(index)
            if parts is not None:
                streams.setdefault(parts[0], []).append(parts[1])
        return streams

    async def list_groups(self, stream: str) -> builtins.list[str]:
        return sorted((await self._groups()).get(stream, []))

    async def list_all(self) -> builtins.list[tuple[str, builtins.list[str]]]:
        return [(name, sorted(groups)) for name, groups in sorted((await self._groups()).items())]

    async def publish_event(self, message: dict[str, Any]) -> None:
        return None


@asynccontextmanager
async def open_adapter(
    config: Config, on_peer_event: PeerEventHandler
) -> AsyncIterator[EmbeddedStreamAdapter]:
    async with open_kv_store(config) as store:
        yield EmbeddedStreamAdapter(store)
