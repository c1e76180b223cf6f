"""The pending-invocation table and the deadline of every call the engine runs.

An :class:`Invocation` is filed here *before* the ``invokefunction`` goes to the
target worker (fixing the v0.4 race where a fast answer could beat the record),
and removed by the task that waits on it, whatever the outcome.  Resolution is
first-wins: the target's ``invocationresult``, the target disconnecting
(``invocation_stopped``), its deadline passing (``timeout``, applied by
:meth:`PendingTable.expire`) or the waiting task giving up (cancellation).

One deadline mechanism for every call, whatever runs it: a routed call's
:class:`Invocation` and an engine function's :class:`NativeCall` (which runs
in its caller's task under a cancel scope created *without* a deadline) file
their deadline in one heap, and the engine's one expiry task
(:func:`iii.routing.expire_invocations`) sleeps until the earliest.  Expiring
an invocation resolves it with ``timeout``; expiring a native call cancels
its scope, and the call answers ``timeout``.  A trio deadline scope costs
about 8 us to open and close on this machine, a heap push well under one.
Entries of calls that ended are not removed one by one; the heap is rebuilt
without them once it holds more than twice the calls running plus a slack,
which keeps it small at any call rate.

Pure bookkeeping, no I/O: the only trio objects are the :class:`trio.Event`
the waiting task sleeps on and a native call's :class:`trio.CancelScope`.
This is, with :mod:`iii.registry`, the core that the state-machine fuzzer
drives.

Lifetime: one :class:`PendingTable` per engine; an :class:`Invocation` lives
from being filed until the task waiting on it discards it, a
:class:`NativeCall` from :meth:`PendingTable.start_native` to
:meth:`PendingTable.end_native`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import trio

from iii.protocol import ErrorBody

__all__ = [
    "Invocation",
    "NativeCall",
    "PendingTable",
    "DuplicateInvocationError",
    "STOPPED",
    "TIMED_OUT",
]

STOPPED = ErrorBody(code="invocation_stopped", message="Invocation stopped")
TIMED_OUT = ErrorBody(code="timeout", message="Invocation timed out")
# Rebuild the deadline heap when it holds this many more entries than twice
# the pending calls (the entries of calls that ended).
_HEAP_SLACK = 1024


class DuplicateInvocationError(Exception):
    """An invocation id that is already pending was used again."""


class Expiring(Protocol):
    """A call the expiry task ended (for its log line)."""

    function_id: str
    invocation_id: str


@attrs.define(eq=False)
class Invocation:
    """One call routed to a worker, from the moment it is filed until it is answered."""

    invocation_id: str
    function_id: str
    target_worker_id: str
    caller_worker_id: str | None = None
    result: Any = None
    error: ErrorBody | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    deadline: float = math.inf  # trio time; resolved TIMED_OUT once it passes
    # Called with the invocation when it is resolved, for a call no task waits
    # on (a call relayed to a peer engine: iii.cluster.relay).
    on_resolve: Callable[[Invocation], None] | None = None

    def resolve(self, *, result: Any = None, error: ErrorBody | None = None) -> bool:
        """Complete the invocation; only the first resolution counts."""
        if self.done.is_set():
            return False
        self.result = result
        self.error = error
        self.done.set()
        if self.on_resolve is not None:
            self.on_resolve(self)
        return True


@attrs.define(eq=False, slots=True)
class NativeCall:
    """An engine function running in its caller's task until ``deadline``:
    the expiry task cancels ``scope`` (which has no deadline of its own)."""

    function_id: str
    invocation_id: str
    deadline: float
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ended: bool = False

    def expire(self) -> bool:
        """Cancel the call (it then answers ``timeout``); False if it had returned."""
        if self.ended:
            return False
        self.scope.cancel()
        return True


@attrs.define(eq=False)
class PendingTable:
    by_id: dict[str, Invocation] = attrs.field(factory=dict)
    by_target: dict[str, set[str]] = attrs.field(factory=dict)
    # (deadline, tie-breaker, call) for every call filed with a deadline: a
    # routed call by its invocation id (a string holds no object alive, so
    # stale entries cost the collector nothing), an engine function by its
    # NativeCall.
    _deadlines: list[tuple[float, int, str | NativeCall]] = attrs.field(factory=list)
    _order: itertools.count[int] = attrs.field(factory=itertools.count)
    # Engine functions running with a deadline filed (start_native .. end_native).
    native_running: int = 0
    # Told (worker id, calls now pending on it) whenever that count changes:
    # the registry orders function replicas by it (Registry.set_pending).
    on_load: Callable[[str, int], None] | None = None
    # Called when the last pending call leaves (the engine's drain waits on it).
    on_empty: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, invocation: Invocation) -> None:
        if invocation.invocation_id in self.by_id:
            raise DuplicateInvocationError(invocation.invocation_id)
        self.by_id[invocation.invocation_id] = invocation
        ids = self.by_target.setdefault(invocation.target_worker_id, set())
        ids.add(invocation.invocation_id)
        if self.on_load is not None:
            self.on_load(invocation.target_worker_id, len(ids))
        if invocation.deadline != math.inf:
            heap = self._deadlines
            if len(heap) > 2 * (len(self.by_id) + self.native_running) + _HEAP_SLACK:
                heap = self._prune_deadlines()
            heapq.heappush(heap, (invocation.deadline, next(self._order), invocation.invocation_id))

    def start_native(self, call: NativeCall) -> None:
        """File an engine function's deadline; :meth:`end_native` when it returns."""
        self.native_running += 1
        heap = self._deadlines
        if len(heap) > 2 * (len(self.by_id) + self.native_running) + _HEAP_SLACK:
            heap = self._prune_deadlines()
        heapq.heappush(heap, (call.deadline, next(self._order), call))

    def end_native(self, call: NativeCall) -> None:
        call.ended = True
        self.native_running -= 1

    def _prune_deadlines(self) -> list[tuple[float, int, str | NativeCall]]:
        by_id = self.by_id
        heap = self._deadlines = [
            entry
            for entry in self._deadlines
            if (entry[2] in by_id if isinstance(entry[2], str) else not entry[2].ended)
        ]
        heapq.heapify(heap)
        return heap

    @property
    def next_deadline(self) -> float:
        """The earliest deadline filed (possibly of a call that has ended), or inf."""
        return self._deadlines[0][0] if self._deadlines else math.inf

    def expire(self, now: float) -> list[Expiring]:
        """End every call whose deadline is ``now`` or earlier with ``timeout``:
        a routed call is resolved, an engine function's scope cancelled."""
        expired: list[Expiring] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, call = heapq.heappop(heap)
            if not isinstance(call, str):
                if call.expire():
                    expired.append(call)
                continue
            invocation = self.by_id.get(call)
            # The same id may have been filed again since, with its own deadline.
            if (
                invocation is not None
                and invocation.deadline == deadline
                and invocation.resolve(error=TIMED_OUT)
            ):
                expired.append(invocation)
        return expired

    def discard(self, invocation: Invocation) -> None:
        if self.by_id.get(invocation.invocation_id) is not invocation:
            return
        del self.by_id[invocation.invocation_id]
        if not self.by_id and self.on_empty is not None:
            self.on_empty()
        ids = self.by_target.get(invocation.target_worker_id)
        if ids is not None:
            ids.discard(invocation.invocation_id)
            if not ids:
                del self.by_target[invocation.target_worker_id]
            if self.on_load is not None:
                self.on_load(invocation.target_worker_id, len(ids))

    def resolve_from(
        self,
        worker_id: str,
        invocation_id: str,
        *,
        result: Any = None,
        error: ErrorBody | None = None,
    ) -> Invocation | None:
        """Apply a worker's ``invocationresult``.

        Only the worker the call was routed to may answer it: a result from any
        other connection, or for an id nobody waits on (a caller that left, a
        late answer after a timeout), is ignored and ``None`` is returned.
        """
        invocation = self.by_id.get(invocation_id)
        if invocation is None or invocation.target_worker_id != worker_id:
            return None
        invocation.resolve(result=result, error=error)
        return invocation

    def abandon(self, invocation_id: str) -> None:
        """The caller stops waiting (its request is over): the call ends ``invocation_stopped``."""
        invocation = self.by_id.get(invocation_id)
        if invocation is not None:
            invocation.resolve(error=STOPPED)

    def stop_target(self, worker_id: str) -> list[Invocation]:
        """The target worker is gone: every call routed to it ends ``invocation_stopped``."""
        stopped = []
        for invocation_id in list(self.by_target.get(worker_id, ())):
            invocation = self.by_id[invocation_id]
            if invocation.resolve(error=STOPPED):
                stopped.append(invocation)
        return stopped

    def executing_on(self, worker_id: str) -> int:
        return len(self.by_target.get(worker_id, ()))
