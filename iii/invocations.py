"""The pending-invocation table: every routed call waiting for its worker's answer.

An :class:`Invocation` is filed here *before* the ``invokefunction`` goes to the
target worker (fixing the v0.4 race where a fast answer could beat the record),
and removed by the task that waits on it, whatever the outcome.  Resolution is
first-wins: the target's ``invocationresult``, the target disconnecting
(``invocation_stopped``) or the waiting task giving up (timeout, cancellation).

Pure bookkeeping, no I/O: the only trio object is the :class:`trio.Event` the
waiting task sleeps on.  This is, with :mod:`iii.registry`, the core that the
state-machine fuzzer drives.

Lifetime: one :class:`PendingTable` per engine; an :class:`Invocation` lives
from being filed until the task waiting on it discards it.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from iii.protocol import ErrorBody

__all__ = ["Invocation", "PendingTable", "DuplicateInvocationError", "STOPPED"]

STOPPED = ErrorBody(code="invocation_stopped", message="Invocation stopped")


class DuplicateInvocationError(Exception):
    """An invocation id that is already pending was used again."""


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

    def resolve(self, *, result: Any = None, error: ErrorBody | None = None) -> bool:
        """Complete the invocation; only the first resolution counts."""
        if self.done.is_set():
            return False
        self.result = result
        self.error = error
        self.done.set()
        return True


@attrs.define(eq=False)
class PendingTable:
    by_id: dict[str, Invocation] = attrs.field(factory=dict)
    by_target: dict[str, set[str]] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, invocation: Invocation) -> None:
        if invocation.invocation_id in self.by_id:
            raise DuplicateInvocationError(invocation.invocation_id)
        self.by_id[invocation.invocation_id] = invocation
        self.by_target.setdefault(invocation.target_worker_id, set()).add(invocation.invocation_id)

    def discard(self, invocation: Invocation) -> None:
        if self.by_id.get(invocation.invocation_id) is not invocation:
            return
        del self.by_id[invocation.invocation_id]
        ids = self.by_target.get(invocation.target_worker_id)
        if ids is not None:
            ids.discard(invocation.invocation_id)
            if not ids:
                del self.by_target[invocation.target_worker_id]

    def resolve_from(
        self, worker_id: str, invocation_id: str, *, result: Any = None, error: ErrorBody | None = None
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
