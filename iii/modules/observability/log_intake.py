"""The intake of the engine's own log records: a thread-safe queue, bounded in bytes.

:class:`~.logs.EngineLogHandler` runs inside ``logging``, in whatever thread
and task wrote the record (a ``trio.to_thread`` worker, a ``run_sync_soon``
callback, a task deep in the engine).  So it does as little as it can there:
it reads what only that context knows (the open span, the causation depth,
the formatted message), makes the entry, and :meth:`LogIntake.put` appends
it here.  Storing it, exporting it and offering it to ``log`` triggers is
done by the observability module on the trio thread (:meth:`LogIntake.take`,
awaited with :meth:`LogIntake.wait`).

Rules:

* first in, first out: entries are taken in the order they were put (one
  lock orders the threads);
* bounded in bytes (``max_bytes``, each entry counted by
  :func:`entry_size`): an entry that does not fit is dropped and counted
  (:attr:`LogIntake.dropped`), so a flood of logs cannot grow memory, and the
  thread that logs never waits;
* :meth:`LogIntake.put` never logs and never calls back into the module, so
  a record written while the module stores or offers one cannot re-enter it.

Lifetime: owned by the observability module; :meth:`LogIntake.wait` is
awaited by its drain task, in its nursery.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import attrs
import trio

__all__ = ["PendingLog", "LogIntake", "entry_size", "PENDING_OVERHEAD"]

# Bytes counted for a queued entry on top of its strings (the dicts, the record).
PENDING_OVERHEAD = 512


def _utf8_len(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 16


def entry_size(entry: dict[str, Any]) -> int:
    """The bytes a queued entry is counted for: its strings as UTF-8, plus overhead.

    An engine entry's body and attribute values are bounded strings
    (:func:`iii.log.record_message`, :func:`iii.log.truncate`); every other
    value counts 16 bytes.
    """
    size = PENDING_OVERHEAD + _utf8_len(entry.get("body"))
    for key, value in (entry.get("attributes") or {}).items():
        size += _utf8_len(key) + _utf8_len(value)
    for key in ("trace_id", "span_id", "instrumentation_scope_name"):
        size += _utf8_len(entry.get(key, ""))
    return size


@attrs.frozen(slots=True)
class PendingLog:
    """An entry waiting to be stored, with the causation depth of the code that wrote it."""

    entry: dict[str, Any]
    depth: int
    size: int


class LogIntake:
    """A FIFO of :class:`PendingLog`, safe to put into from any thread (module docstring)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # Entries refused because ``max_bytes`` were queued already.
        self.dropped = 0
        self.peak_bytes = 0
        self._lock = threading.Lock()
        self._items: deque[PendingLog] = deque()
        self._bytes = 0
        # The drain task waiting in wait(): woken through its trio token.
        self._waiter: tuple[trio.lowlevel.TrioToken, trio.Event] | None = None

    @property
    def bytes(self) -> int:
        """The bytes queued now (at most ``max_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put(self, entry: dict[str, Any], depth: int) -> bool:
        """Queue ``entry`` (any thread, never waits); False if it did not fit (counted)."""
        pending = PendingLog(entry=entry, depth=depth, size=entry_size(entry))
        with self._lock:
            if self._bytes + pending.size > self.max_bytes:
                self.dropped += 1
                return False
            self._items.append(pending)
            self._bytes += pending.size
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            token, ready = waiter
            try:
                token.run_sync_soon(ready.set)
            except trio.RunFinishedError:
                pass  # the drain's trio run is over: nobody takes it any more
        return True

    def take(self, limit: int | None = None) -> list[PendingLog]:
        """The oldest ``limit`` entries queued (all of them if None), oldest first."""
        with self._lock:
            if limit is None or limit >= len(self._items):
                items = list(self._items)
                self._items.clear()
                self._bytes = 0
            else:
                items = [self._items.popleft() for _ in range(limit)]
                self._bytes -= sum(pending.size for pending in items)
        return items

    async def wait(self) -> None:
        """Return once something is queued (from the trio thread, one waiter at a time)."""
        ready = trio.Event()
        with self._lock:
            empty = not self._items
            if empty:
                self._waiter = (trio.lowlevel.current_trio_token(), ready)
        if not empty:
            await trio.lowlevel.checkpoint()
            return
        try:
            await ready.wait()  # set by the put() that takes the waiter
        finally:
            with self._lock:
                if self._waiter is not None and self._waiter[1] is ready:
                    self._waiter = None
