"""The embedded key-value store (upstream's ``BuiltinKvStore``, spec modules.md §0.4).

Used by the KV server, the State and Stream ``KvStore`` adapters, and open to
any module that needs local persistence (the builtin queue may build on it).

Data model: ``index -> ordered map (key -> JSON value)``.  Keys keep their
insertion order (re-setting a key keeps its place); an index whose last key
is deleted disappears.

API (all async; values are plain JSON values, returned as fresh objects the
caller may keep or change)::

    async with open_kv_store(KvStoreConfig.from_raw(raw)) as store:
        old = await store.set("users", "u1", {"name": "a"})     # -> previous value or None
        old = await store.set("users", "u1", value, limits)     # refused unless it fits
        value = await store.get("users", "u1")                  # -> value or None
        old = await store.delete("users", "u1")                 # -> removed value or None
        result = await store.update("users", "u1", ops)         # -> UpdateResult (old, new, errors)
        await store.list("users")                               # -> [values], insertion order
        await store.items("users")                              # -> [(key, value)]
        await store.keys("users"); await store.list_indexes()
        await store.write_batch([("set", i, k, v), ("delete", i, k)])   # all or nothing

A write is applied in memory, then appended to the record log
(:mod:`iii.adapters.filelog`) and fsync'd before the call returns, so every
write a caller saw acknowledged survives ``kill -9``.  A batch is one record,
so recovery sees all of it or none.  Reads never wait for the disk.

A write is checked completely before it changes anything (issue 10 row 4):
the value is encoded, the caller's :class:`~iii.adapters.limits.WriteLimits`
(``max_value_bytes``, and what its answer may carry) are checked against the
encoded sizes, and the log record is framed, which refuses a record the log
could not read back (``max_record``, a parameter of :func:`open_kv_store`).
Only then is memory changed and the frame appended, so a refused write
(``VALUE_TOO_LARGE``, ``payload_too_large``) leaves memory and disk as they
were, and the log never holds a record that would stop its recovery.

Config keys (``store_method``, ``file_path``, ``save_interval_ms``) are
upstream's.  With ``store_method: file_based`` the store lives in the
directory ``file_path``: ``store.log`` (the record log) and ``LOCK`` (an
exclusive ``flock``, so two stores — two modules, or two engines — can never
share a directory and overwrite each other's data; the second one fails to
open with a clear error).  ``save_interval_ms`` is how often the log is
checked for compaction: it is rewritten from the live data once it holds
more than ``max(1000, 2 × live keys)`` records.  Unknown ``store_method``
values fall back to ``in_memory`` with a warning, as upstream.

A damaged log tail (torn write, bad checksum) is reported by the record log
(logged, file copied aside) and exposed as :attr:`KvStore.recovery`.  If the
disk fails during a write, the store refuses every later call with
``adapter_unavailable``: memory and disk no longer agree, so a restart (which
reloads the log) is the only safe way on.

Lifetime: :func:`open_kv_store` owns the log, the lock and the compaction
task (in its own nursery); leaving the block closes them.
"""

from __future__ import annotations

import builtins
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from iii.adapters.filelog import (
    MAX_RECORD,
    RecordLog,
    RecordTooLargeError,
    Recovery,
    open_record_log,
)
from iii.adapters.limits import NO_LIMITS, WriteLimits
from iii.config_schema import Count
from iii.errors import AdapterUnavailableError, ConfigError
from iii.update_ops import MISSING, UpdateOp, UpdateResult, apply_ops

__all__ = ["KvStore", "KvStoreConfig", "KvStoreLockedError", "open_kv_store", "Mutation"]

log = logging.getLogger(__name__)

LOG_NAME = "store.log"
LOCK_NAME = "LOCK"
COMPACT_MIN_RECORDS = 1000

# ("set", index, key, value) or ("delete", index, key)
Mutation = tuple[Any, ...]


class KvStoreLockedError(ConfigError):
    """Another store (module or engine) already has this directory open."""


STORE_METHODS = ("in_memory", "file_based")


@attrs.frozen(kw_only=True)
class KvStoreConfig:
    """The embedded store's keys (upstream's), in the config of every owner
    (the kv_server module, the embedded state and stream backends)."""

    # Any other value means in_memory, with a warning when the store opens (as upstream).
    store_method: str = "in_memory"
    file_path: str = "kv_store_data.db"
    save_interval_ms: Count = Count(5000)

    @property
    def file_based(self) -> bool:
        return self.store_method == "file_based"

    @property
    def save_interval(self) -> float:
        return self.save_interval_ms / 1000


@attrs.frozen(kw_only=True)
class KvStoreStatistics:
    indexes: int
    keys: int
    log_bytes: int
    log_records: int


def _loads(encoded: bytes | None) -> Any:
    return None if encoded is None else orjson.loads(encoded)


@attrs.define(eq=False)
class KvStore:
    config: KvStoreConfig
    _data: dict[str, dict[str, bytes]] = attrs.field(factory=dict)
    _log: RecordLog | None = None
    recovery: Recovery | None = None
    _failed: str | None = None

    # -- reads -------------------------------------------------------------------

    def _check(self) -> None:
        if self._failed is None and self._log is not None and self._log.failure is not None:
            # A compaction that failed midway: refuse before any change.
            self._failed = f"{self._log.failure.strerror or self._log.failure} ({self._log.path})"
        if self._failed is not None:
            raise AdapterUnavailableError(
                f"the key-value store is unusable after a disk error: {self._failed}"
            )

    async def get(self, index: str, key: str) -> Any:
        self._check()
        return _loads(self._data.get(index, {}).get(key))

    async def list(self, index: str) -> builtins.list[Any]:
        self._check()
        return [orjson.loads(v) for v in self._data.get(index, {}).values()]

    async def items(self, index: str) -> builtins.list[tuple[str, Any]]:
        self._check()
        return [(k, orjson.loads(v)) for k, v in self._data.get(index, {}).items()]

    async def keys(self, index: str) -> builtins.list[str]:
        self._check()
        return list(self._data.get(index, {}))

    async def list_indexes(self) -> builtins.list[str]:
        self._check()
        return list(self._data)

    def statistics(self) -> KvStoreStatistics:
        return KvStoreStatistics(
            indexes=len(self._data),
            keys=sum(len(m) for m in self._data.values()),
            log_bytes=self._log.size if self._log else 0,
            log_records=self._log.records_since_rewrite if self._log else 0,
        )

    # -- writes ------------------------------------------------------------------

    def _put(self, index: str, key: str, encoded: bytes) -> bytes | None:
        entries = self._data.setdefault(index, {})
        old = entries.get(key)
        entries[key] = encoded
        return old

    def _pop(self, index: str, key: str) -> bytes | None:
        entries = self._data.get(index)
        if entries is None:
            return None
        old = entries.pop(key, None)
        if not entries:
            del self._data[index]
        return old

    def _frame(self, record: Any) -> bytes | None:
        """The log frame of a change, made before the change is applied (it
        raises RecordTooLargeError for a record the log refuses); None in memory."""
        return None if self._log is None else self._log.encode(record)

    async def _persist(self, frame: bytes | None) -> None:
        """Make an applied change durable.  Must be called with no await
        between the in-memory change and this call, so log order = memory order."""
        if self._log is None or frame is None:
            return
        try:
            # Shielded: once applied in memory the record must reach the disk
            # even if the caller is cancelled (the fsync is bounded).
            with trio.CancelScope(shield=True):
                await self._log.append_encoded((frame,))
        except OSError as exc:
            self._failed = f"{exc.strerror or exc} ({self._log.path})"
            log.critical("key-value store write failed; refusing further use: %s", self._failed)
            raise AdapterUnavailableError(
                f"the key-value store could not write to disk: {self._failed}"
            ) from None

    def _current(self, index: str, key: str) -> bytes | None:
        return self._data.get(index, {}).get(key)

    async def set(self, index: str, key: str, value: Any, limits: WriteLimits = NO_LIMITS) -> Any:
        """Store ``value``; returns the previous value or None."""
        self._check()
        encoded = orjson.dumps(value)
        current = self._current(index, key)
        limits.check_write(old_bytes=len(current or b""), new_bytes=len(encoded))
        frame = self._frame(["set", index, key, orjson.Fragment(encoded)])
        old = self._put(index, key, encoded)
        await self._persist(frame)
        return _loads(old)

    async def delete(self, index: str, key: str, limits: WriteLimits = NO_LIMITS) -> Any:
        """Remove ``key``; returns the removed value or None (nothing is logged then)."""
        self._check()
        current = self._current(index, key)
        if current is None:
            return None
        limits.check_delete(old_bytes=len(current))
        frame = self._frame(["del", index, key])
        old = self._pop(index, key)
        await self._persist(frame)
        return _loads(old)

    async def update(
        self, index: str, key: str, ops: builtins.list[UpdateOp], limits: WriteLimits = NO_LIMITS
    ) -> UpdateResult:
        """Apply update ops atomically (no other write can interleave)."""
        self._check()
        current = self._current(index, key)
        old_value = MISSING if current is None else orjson.loads(current)
        new_value, errors = apply_ops(old_value, ops)
        encoded = orjson.dumps(new_value)
        limits.check_write(old_bytes=len(current or b""), new_bytes=len(encoded), errors=errors)
        frame = self._frame(["set", index, key, orjson.Fragment(encoded)])
        self._put(index, key, encoded)
        await self._persist(frame)
        return UpdateResult(None if old_value is MISSING else old_value, new_value, errors)

    async def write_batch(self, mutations: Iterable[Mutation]) -> None:
        """Apply ``("set", index, key, value)`` / ``("delete", index, key)`` atomically."""
        self._check()
        records: builtins.list[Any] = []
        prepared: builtins.list[tuple[str, str, bytes | None]] = []
        for mutation in mutations:
            kind = mutation[0]
            if kind == "set":
                encoded = orjson.dumps(mutation[3])
                prepared.append((mutation[1], mutation[2], encoded))
                records.append(["set", mutation[1], mutation[2], orjson.Fragment(encoded)])
            elif kind == "delete":
                # Logged even when absent (replaying it is a no-op): the record
                # is framed, and checked, before anything is applied.
                prepared.append((mutation[1], mutation[2], None))
                records.append(["del", mutation[1], mutation[2]])
            else:
                raise ValueError(f"unknown mutation {kind!r}")
        if not records:
            return
        frame = self._frame(records[0] if len(records) == 1 else ["batch", records])
        for index, key, value in prepared:  # all checked first: nothing half-applied
            if value is not None:
                self._put(index, key, value)
            else:
                self._pop(index, key)
        await self._persist(frame)

    # -- recovery and compaction ---------------------------------------------------

    def _replay(self, records: builtins.list[Any]) -> None:
        for record in records:
            self._replay_one(record)

    def _replay_one(self, record: Any) -> None:
        kind = record[0]
        if kind == "set":
            self._put(record[1], record[2], orjson.dumps(record[3]))
        elif kind == "del":
            self._pop(record[1], record[2])
        elif kind == "batch":
            for inner in record[1]:
                self._replay_one(inner)
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def _snapshot(self) -> Iterator[Any]:
        for index, entries in self._data.items():
            for key, encoded in entries.items():
                yield ["set", index, key, orjson.Fragment(encoded)]

    def _needs_compaction(self) -> bool:
        if self._log is None:
            return False
        live = sum(len(m) for m in self._data.values())
        return self._log.records_since_rewrite > max(COMPACT_MIN_RECORDS, 2 * live)

    async def compact(self) -> None:
        """Rewrite the log from the live data (crash-safe)."""
        if self._log is None or self._failed is not None:
            return
        # The snapshot generator is consumed under the log's lock, after every
        # record queued so far, so it holds all of them (see RecordLog.rewrite).
        try:
            await self._log.rewrite(self._snapshot())
        except (OSError, RecordTooLargeError) as exc:
            log.error("key-value store compaction failed (the old log is kept): %s", exc)

    async def _compact_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.save_interval)
            if self._needs_compaction():
                await self.compact()


def _lock_directory(directory: Path) -> int:
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KvStoreLockedError(
            "another key-value store (another module, or another engine) already uses this "
            "directory; give each store its own file_path",
            key=str(directory),
        ) from None
    return fd


@asynccontextmanager
async def open_kv_store(
    config: KvStoreConfig, *, max_record: int = MAX_RECORD
) -> AsyncIterator[KvStore]:
    """Open the store: in memory, or loaded from (and logged to) ``file_path``.

    ``max_record`` bounds one log record (one write, or one batch); tests
    make it small.
    """
    if config.store_method not in STORE_METHODS:
        log.warning("unknown store_method %r, using in_memory", config.store_method)
    store = KvStore(config)
    if not config.file_based:
        yield store
        return
    directory = Path(config.file_path)
    await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
    lock_fd = await trio.to_thread.run_sync(_lock_directory, directory)
    try:
        record_log, records, recovery = await open_record_log(
            directory / LOG_NAME, max_record=max_record
        )
        store._log = record_log
        store.recovery = recovery
        try:
            store._replay(records)
            log.info(
                "key-value store %s: %d keys in %d indexes loaded from %d records",
                directory,
                store.statistics().keys,
                len(store._data),
                len(records),
            )
            async with trio.open_nursery() as store_nursery:
                store_nursery.start_soon(store._compact_periodically)
                try:
                    yield store
                finally:
                    store_nursery.cancel_scope.cancel()
        finally:
            await record_log.aclose()
    finally:
        os.close(lock_fd)
