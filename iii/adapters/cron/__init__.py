"""Cron lock adapters: who may fire a cron job for one scheduled time.

A lock is taken on ``(job, scheduled time)`` and never released early: it
expires after its TTL.  So each scheduled time fires once however many
engine instances run the job, even when their clocks differ by less than the
TTL (spec modules.md §3 describes upstream's weaker lock, released right after
the run, which only prevents overlap).

Backends, looked up by upstream class name:

* ``modules::cron::KvCronAdapter`` (default): in-process (:mod:`.memory`);
  one engine fires each time once, but separate engines do not see each other.
* ``modules::cron::RedisCronAdapter``: ``SET key owner NX PX ttl`` on a shared
  Redis (:mod:`.redis`).

:func:`open_cron_adapter` is an async context manager owning the backend's
connections for the module's lifetime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from iii.adapters import import_backend
from iii.config import AdapterRef
from iii.errors import ConfigError

__all__ = ["CronLockAdapter", "open_cron_adapter", "BACKENDS", "DEFAULT_ADAPTER"]

DEFAULT_ADAPTER = "modules::cron::KvCronAdapter"

BACKENDS = {
    "modules::cron::KvCronAdapter": "iii.adapters.cron.memory",
    "modules::cron::RedisCronAdapter": "iii.adapters.cron.redis",
}


class CronLockAdapter(Protocol):
    lock_ttl: float

    async def try_lock(self, key: str) -> bool:
        """Take ``key`` for ``lock_ttl`` seconds; False if someone holds it.

        Raises :class:`~iii.errors.AdapterUnavailableError` when the backend
        cannot be reached.
        """
        ...


@asynccontextmanager
async def open_cron_adapter(ref: AdapterRef | None) -> AsyncIterator[CronLockAdapter]:
    backend, raw = import_backend("cron", BACKENDS, ref, DEFAULT_ADAPTER, key="adapter.class")
    config: Any = raw or {}
    if not isinstance(config, dict):
        raise ConfigError("adapter config must be a mapping", key="adapter.config")
    async with backend.open_adapter(config) as adapter:
        yield adapter
