"""Cron locks on Redis (``modules::cron::RedisCronAdapter``).

``SET <key_prefix>cron_lock:<job>:<scheduled ms> <instance> NX PX <ttl>``:
the first engine instance to set the key fires that scheduled time; the key
expires by itself.  The coredis client (and its connection pool, which runs
tasks of its own) is opened for the adapter's lifetime.

Config (:class:`Config`): ``redis_url`` (``redis://localhost:6379``), and
our additions ``lock_ttl_ms`` (30000) and ``key_prefix`` (``""``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import coredis
import trio
from coredis.tokens import PureToken

from iii.adapters.redis_support import is_outage
from iii.adapters.settings import RedisCronConfig
from iii.errors import AdapterUnavailableError

__all__ = ["Config", "RedisCronLocks", "open_adapter"]

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 5.0

Config = RedisCronConfig  # declared in iii.adapters.settings (read without importing coredis)


def _unavailable(exc: BaseException) -> bool:
    """A lost connection (in any of its shapes, see is_outage), a timeout, or an error from Redis."""
    return is_outage(exc) or isinstance(exc, (coredis.exceptions.RedisError, trio.TooSlowError))


@attrs.define(eq=False)
class RedisCronLocks:
    client: Any
    key_prefix: str
    lock_ttl: float
    owner: str = attrs.field(factory=lambda: str(uuid.uuid4()))

    async def try_lock(self, key: str) -> bool:
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                taken = await self.client.set(
                    f"{self.key_prefix}cron_lock:{key}",
                    self.owner,
                    condition=PureToken.NX,
                    px=int(self.lock_ttl * 1000),
                )
        except Exception as exc:
            if _unavailable(exc):
                raise AdapterUnavailableError(f"Redis cron lock failed: {exc!r}") from exc
            raise
        return bool(taken)


@asynccontextmanager
async def open_adapter(config: Config, hooks: None) -> AsyncIterator[RedisCronLocks]:
    url = config.redis_url
    client = coredis.Redis.from_url(url, connect_timeout=5, stream_timeout=COMMAND_TIMEOUT)
    async with client:
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                await client.ping()
        except Exception as exc:
            if _unavailable(exc):
                raise AdapterUnavailableError(f"cannot reach Redis at {url}: {exc!r}") from exc
            raise
        yield RedisCronLocks(
            client=client, key_prefix=config.key_prefix, lock_ttl=config.lock_ttl_ms / 1000
        )
