"""In-process cron locks (``modules::cron::KvCronAdapter``).

The locks live in a dict owned by the adapter for the module's lifetime;
expired entries are dropped as new ones are taken.  Config keys (upstream):
``lock_ttl_ms`` (30000) and ``lock_index``; the kv-store keys
(``store_method``, ``file_path``, ``save_interval_ms``) are accepted and not
used, since a lock only has to outlive one scheduled time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from iii.errors import ConfigError

__all__ = ["MemoryCronLocks", "open_adapter"]

log = logging.getLogger(__name__)

KNOWN_KEYS = {"lock_ttl_ms", "lock_index", "store_method", "file_path", "save_interval_ms"}


@attrs.define(eq=False)
class MemoryCronLocks:
    lock_ttl: float = 30.0
    _held: dict[str, float] = attrs.field(factory=dict)  # key -> expiry (trio clock)

    async def try_lock(self, key: str) -> bool:
        now = trio.current_time()
        if len(self._held) > 1024:
            self._held = {k: exp for k, exp in self._held.items() if exp > now}
        expiry = self._held.get(key)
        if expiry is not None and expiry > now:
            return False
        self._held[key] = now + self.lock_ttl
        return True


def _ttl(config: dict[str, Any]) -> float:
    ttl = config.get("lock_ttl_ms", 30_000)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ConfigError("lock_ttl_ms must be a positive integer", key="adapter.config.lock_ttl_ms")
    return ttl / 1000


@asynccontextmanager
async def open_adapter(config: dict[str, Any]) -> AsyncIterator[MemoryCronLocks]:
    unknown = set(config) - KNOWN_KEYS
    if unknown:
        log.warning("KvCronAdapter: ignoring unknown config keys %s", sorted(unknown))
    yield MemoryCronLocks(lock_ttl=_ttl(config))
