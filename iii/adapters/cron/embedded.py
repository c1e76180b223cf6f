"""In-process cron locks (``modules::cron::KvCronAdapter``, or ``embedded``).

The locks live in a dict owned by the adapter for the module's lifetime;
expired entries are dropped as new ones are taken.  Config keys (upstream):
``lock_ttl_ms`` (30000) and ``lock_index``; the kv-store keys
(``store_method``, ``file_path``, ``save_interval_ms``) are accepted and not
used, since a lock only has to outlive one scheduled time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from iii.config_schema import Count

__all__ = ["Config", "EmbeddedCronLocks", "open_adapter"]


@attrs.frozen(kw_only=True)
class Config:
    lock_ttl_ms: Count = Count(30_000)
    # Upstream's keys, accepted and not used (see the module docstring).
    lock_index: str = "cron_locks"
    store_method: str = "in_memory"
    file_path: str = "kv_store_data.db"
    save_interval_ms: Count = Count(5000)

    @property
    def lock_ttl(self) -> float:
        return self.lock_ttl_ms / 1000


@attrs.define(eq=False)
class EmbeddedCronLocks:
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


@asynccontextmanager
async def open_adapter(config: Config, hooks: None) -> AsyncIterator[EmbeddedCronLocks]:
    yield EmbeddedCronLocks(lock_ttl=config.lock_ttl)
