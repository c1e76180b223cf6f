"""Cron lock adapters: who may fire a cron job for one scheduled time.

A lock is taken on ``(job, scheduled time)`` and never released early: it
expires after its TTL.  So each scheduled time fires once however many
engine instances run the job, even when their clocks differ by less than the
TTL (spec modules.md §3 describes upstream's weaker lock, released right after
the run, which only prevents overlap).

Backends, looked up by upstream class name (see :mod:`iii.adapters` for the
shape every kind shares):

* ``modules::cron::KvCronAdapter`` (default; also ``embedded``): in-process
  (:mod:`.embedded`); one engine fires each time once, but separate engines
  do not see each other.
* ``modules::cron::RedisCronAdapter``: ``SET key owner NX PX ttl`` on a shared
  Redis (:mod:`.redis`).

:func:`open_cron_adapter` is an async context manager owning the backend's
connections for the module's lifetime.  The backends call nothing back
(``hooks`` is None).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from iii.adapters import Backend, adapter_kind, backend, open_backend
from iii.adapters.cron import embedded
from iii.adapters.cron.base import CronLockAdapter
from iii.adapters.settings import RedisCronConfig
from iii.config_schema import AdapterRef

__all__ = ["CronLockAdapter", "CronAdapterRef", "open_cron_adapter", "BACKENDS", "DEFAULT_ADAPTER"]

DEFAULT_ADAPTER = "modules::cron::KvCronAdapter"


# The embedded backend is imported with the package; the others only when a
# config chooses them (their config classes live apart, in iii.adapters.settings
# or the queue's base.py, so loading a config does not import them).  Each
# opener is typed: mypy holds the backend's factory to its config class and
# what it yields to the Protocol.
def _open_redis(
    config: RedisCronConfig, hooks: None
) -> AbstractAsyncContextManager[CronLockAdapter]:
    from iii.adapters.cron import redis

    return redis.open_adapter(config, hooks)


BACKENDS: dict[str, Backend[Any, None, CronLockAdapter]] = {
    DEFAULT_ADAPTER: backend(embedded.Config, embedded.open_adapter),
    "modules::cron::RedisCronAdapter": backend(RedisCronConfig, _open_redis),
}


class CronAdapterRef(AdapterRef):
    """The cron module's ``adapter`` block."""

    KIND = adapter_kind("cron", BACKENDS, DEFAULT_ADAPTER)


def open_cron_adapter(
    ref: CronAdapterRef | None = None,
) -> AbstractAsyncContextManager[CronLockAdapter]:
    return open_backend(BACKENDS, ref or CronAdapterRef.default(), None)
