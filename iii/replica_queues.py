"""The pick order of a function's replicas: :class:`ReplicaQueues`.

Pure and synchronous, owned by :class:`iii.registry.FunctionEntry` (kept
while the function has two replicas or more); the policy is stated in
:mod:`iii.registry`'s docstring: fewest calls pending on the worker, then
longest waiting, where a peer engine's replica (a remote pseudo worker)
counts its calls in flight plus one.

Lifetime: one per shared function, dropped when it is back to one replica.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

__all__ = ["ReplicaQueues"]


@attrs.define(eq=False)
class _LoadQueues:
    """Replicas (worker ids) in pick order: one FIFO per pending count, each
    replica with the stamp of the moment it took its place there."""

    queues: dict[int, OrderedDict[str, int]] = attrs.field(factory=dict)
    # The smallest count with a non-empty FIFO (meaningless while empty).
    least: int = 0

    def add(self, owner: str, load: int, stamp: int) -> None:
        queue = self.queues.get(load)
        if queue is None:
            queue = self.queues[load] = OrderedDict()
        queue[owner] = stamp
        if len(self.queues) == 1 or load < self.least:
            self.least = load

    def take(self, owner: str, load: int) -> None:
        queue = self.queues[load]
        del queue[owner]
        if not queue:
            del self.queues[load]

    def front(self) -> tuple[str, int]:
        """The longest waiting of the least loaded, and its stamp (non-empty only)."""
        return next(iter(self.queues[self.least].items()))


@attrs.define(eq=False)
class ReplicaQueues:
    """A shared function's replicas in pick order (module docstring).

    Two groups of FIFOs per pending count: this engine's replicas, and those
    of peer engines in a cluster (:attr:`WorkerInfo.remote`, whose count is
    set to the peer's calls in flight plus one, so an idle local replica
    wins).  A pick takes the better of the two groups' fronts by (count,
    stamp), where the stamp orders places across groups as the FIFOs do
    within one; :meth:`pick_local` looks at the local group only (a call a
    peer forwarded).  Pick, and a worker's count going up or down by one,
    are O(1); a replica leaving is O(distinct counts) when it empties the
    least FIFO of its group.
    """

    load: dict[str, int] = attrs.field(factory=dict)
    local: _LoadQueues = attrs.field(factory=_LoadQueues)
    remote: _LoadQueues = attrs.field(factory=_LoadQueues)
    remote_owners: set[str] = attrs.field(factory=set)
    tick: int = 0

    def __len__(self) -> int:
        return len(self.load)

    def _group(self, owner: str) -> _LoadQueues:
        return self.remote if owner in self.remote_owners else self.local

    def add(self, owner: str, load: int, *, remote: bool = False) -> None:
        """Enter ``owner`` at the back of the queue for ``load``."""
        self.load[owner] = load
        if remote:
            self.remote_owners.add(owner)
        self.tick += 1
        self._group(owner).add(owner, load, self.tick)

    def remove(self, owner: str) -> None:
        group = self._group(owner)
        group.take(owner, self.load.pop(owner))
        self.remote_owners.discard(owner)
        if group.least not in group.queues and group.queues:
            group.least = min(group.queues)

    def move(self, owner: str, load: int) -> None:
        """``owner``'s worker now has ``load`` calls pending: to the back of that queue."""
        group = self._group(owner)
        old = self.load[owner]
        group.take(owner, old)
        self.load[owner] = load
        self.tick += 1
        group.add(owner, load, self.tick)
        if group.least not in group.queues:  # ``old`` was the least queue and emptied
            group.least = load if load == old + 1 else min(group.queues)

    def waiting_order(self) -> list[str]:
        """Every replica, fewest pending first, then longest waiting (O(n log n))."""
        places = [
            (load, stamp, owner)
            for group in (self.local, self.remote)
            for load, queue in group.queues.items()
            for owner, stamp in queue.items()
        ]
        return [owner for _, _, owner in sorted(places)]

    def renew(self, owner: str) -> None:
        """``owner`` was picked: to the back of its queue."""
        queue = self._group(owner).queues[self.load[owner]]
        self.tick += 1
        queue[owner] = self.tick
        queue.move_to_end(owner)

    def pick(self) -> str:
        """The front of the least-loaded queue (of either group), which goes to its back."""
        local, remote = self.local, self.remote
        if not remote.queues:
            group = local
        elif not local.queues:
            group = remote
        else:
            _, local_stamp = local.front()
            _, remote_stamp = remote.front()
            group = local if (local.least, local_stamp) < (remote.least, remote_stamp) else remote
        queue = group.queues[group.least]
        owner = next(iter(queue))
        self.tick += 1
        queue[owner] = self.tick
        queue.move_to_end(owner)
        return owner

    def pick_local(self) -> str | None:
        """As :meth:`pick`, among this engine's replicas only (None: there are none)."""
        local = self.local
        if not local.queues:
            return None
        queue = local.queues[local.least]
        owner = next(iter(queue))
        self.tick += 1
        queue[owner] = self.tick
        queue.move_to_end(owner)
        return owner
