"""Inbound bytes: what the engine holds of what its peers sent, bounded in bytes.

Peer data waits in the engine's memory before it is used in two places:
WebSocket messages, received whole by trio-websocket's reader and queued for
ours (:class:`iii.wsconnection.GuardedConnection`), and REST request bodies read
whole for JSON (:mod:`iii.modules.rest_api`).  Both are counted in bytes
against an :class:`InboundBudget`: the engine's (``max_inbound_bytes``) for
every WebSocket port (the stream port's clients through a share of it, the
stream module's ``max_inbound_bytes``), the REST module's own
(``max_body_bytes_in_flight``) for bodies.

The rule (:meth:`InboundBudget.try_take`):

* bytes are taken *before more is read*: a holder whose bytes do not fit
  waits, and while it waits its peer is not read (backpressure: the rest
  stays in the kernel's socket buffers and the peer's);
* **the oldest receiver goes first**: of the holders still receiving, the one
  that started waiting for budget first may go past ``limit``, up to
  ``limit + slack`` (``slack`` is the largest message or body).  Without it, a
  few large messages received at once could each hold part of the budget and
  wait for each other forever; with it, the oldest always completes, is
  handed over, and its bytes come back.  So a budget never holds more than
  ``limit + slack``;
* bytes come back when the data is handed over (our reader took the message,
  the request's call ended) or dropped.

:class:`InboundAccount` is one connection's share: its first ``allowance``
bytes (small frames in flight) do not draw on the budget at all, so a
connection of small frames never waits for it, and pays a comparison per
message.  Sizes are the memory of the objects (``sys.getsizeof``: a ``str``
of non-ASCII text takes 2 or 4 bytes a character).

Lifetime: a budget lives as long as its owner (the engine, the REST module);
an account as long as its connection, and :meth:`InboundAccount.close` gives
everything back when the connection ends.
"""

from __future__ import annotations

import math

import attrs
import trio

__all__ = ["InboundBudget", "InboundAccount", "InboundStatistics"]


@attrs.frozen(kw_only=True)
class InboundStatistics:
    limit: int
    used: int  # bytes held now
    peak: int  # the most held at once since start
    waiting: int  # holders waiting for room now (here and in its shares)
    timed_out: int  # waits that ended without room (here and in its shares)


@attrs.define(eq=False)
class InboundBudget:
    """Bytes held for all holders together (see the module docstring).

    A budget may have a ``parent``: bytes taken here are taken there too, so a
    port's sockets (the stream port's) hold at most their share, and their
    share counts in the engine's.  A holder is receiving in both from its first
    request on, in the same order, so the oldest receiver of the parent is also
    the oldest of its own budget, and may go first in both.
    """

    limit: int
    slack: int = 0
    parent: InboundBudget | None = None
    used: int = 0
    peak: int = 0
    timed_out: int = 0
    # Holders that asked for budget and are still receiving, oldest first.
    _receiving: dict[object, None] = attrs.field(factory=dict)
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _children: list[InboundBudget] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        if self.parent is not None:
            self.parent._children.append(self)

    def share(self, limit: int, *, slack: int) -> InboundBudget:
        """A budget of at most ``limit`` bytes, taken from this one."""
        return InboundBudget(limit=limit, slack=slack, parent=self)

    def try_take(self, holder: object, size: int) -> bool:
        """Take ``size`` bytes for ``holder`` if they fit now; it is then receiving."""
        budget: InboundBudget | None = self
        while budget is not None:
            if holder not in budget._receiving:
                budget._receiving[holder] = None
            budget = budget.parent
        budget = self
        while budget is not None:
            if not budget._fits(holder, size):
                return False
            budget = budget.parent
        budget = self
        while budget is not None:
            used = budget.used = budget.used + size
            if used > budget.peak:
                budget.peak = used
            budget = budget.parent
        return True

    def _fits(self, holder: object, size: int) -> bool:
        used = self.used + size
        return used <= self.limit or (
            used <= self.limit + self.slack and next(iter(self._receiving)) is holder
        )

    async def take(self, holder: object, size: int, *, deadline: float) -> bool:
        """Take ``size`` bytes, waiting for room until ``deadline``; False if none came."""
        if self.try_take(holder, size):
            return True
        with trio.move_on_at(deadline):
            while True:
                await self._lot.park()
                if self.try_take(holder, size):
                    return True
        self.timed_out += 1
        return False

    def give_back(self, size: int) -> None:
        budget: InboundBudget | None = self
        top = self
        while budget is not None:
            budget.used -= size
            top, budget = budget, budget.parent
        top._wake()

    def done_receiving(self, holder: object) -> None:
        """``holder`` has what it was receiving: it no longer goes first."""
        budget: InboundBudget | None = self
        top, first = self, False
        while budget is not None:
            receiving = budget._receiving
            if holder in receiving:
                first = first or next(iter(receiving)) is holder
                del receiving[holder]
            top, budget = budget, budget.parent
        if first:
            top._wake()  # someone else is first now

    def _wake(self) -> None:
        """Room may have come: every waiter here and below looks again."""
        if self._lot:
            self._lot.unpark_all()
        for child in self._children:
            child._wake()

    def statistics(self) -> InboundStatistics:
        """This budget's numbers; ``waiting`` and ``timed_out`` include its shares'."""
        shares = [child.statistics() for child in self._children]
        return InboundStatistics(
            limit=self.limit,
            used=self.used,
            peak=self.peak,
            waiting=len(self._lot) + sum(share.waiting for share in shares),
            timed_out=self.timed_out + sum(share.timed_out for share in shares),
        )


@attrs.define(eq=False)
class InboundAccount:
    """One connection's bytes: the first ``allowance`` free, the rest from ``budget``.

    Invariant: ``charged == max(0, held - allowance)`` when there is a budget.
    """

    budget: InboundBudget | None = None
    allowance: int = 0
    wait_timeout: float = math.inf
    held: int = 0
    charged: int = 0
    # Registered in the budget as receiving (see InboundBudget.try_take).
    receiving: bool = False

    def add_nowait(self, size: int) -> bool:
        """Count ``size`` more bytes if the budget has room now (always, within the allowance)."""
        held = self.held + size
        need = held - self.allowance - self.charged
        if need > 0 and self.budget is not None:
            self.receiving = True
            if not self.budget.try_take(self, need):
                return False
            self.charged += need
        self.held = held
        return True

    async def add(self, size: int, *, deadline: float | None = None) -> bool:
        """Count ``size`` more bytes, waiting for room up to ``wait_timeout`` (or until
        ``deadline``); False if none came."""
        if self.add_nowait(size):
            return True
        budget = self.budget
        assert budget is not None  # without one, add_nowait always counts
        need = self.held + size - self.allowance - self.charged
        if deadline is None:
            deadline = trio.current_time() + self.wait_timeout
        if not await budget.take(self, need, deadline=deadline):
            return False
        self.charged += need
        self.held += size
        return True

    def remove(self, size: int) -> None:
        """``size`` bytes were handed over or dropped."""
        self.held -= size
        over = self.charged - max(0, self.held - self.allowance)
        if over > 0:
            self.charged -= over
            assert self.budget is not None
            self.budget.give_back(over)

    def message_done(self) -> None:
        """A message (a body) is complete: this connection no longer goes first."""
        if self.receiving:
            self.receiving = False
            assert self.budget is not None
            self.budget.done_receiving(self)

    def close(self) -> None:
        """The connection ended: everything it held is given back (idempotent)."""
        self.message_done()
        self.held = 0
        charged, self.charged = self.charged, 0
        if charged and self.budget is not None:
            self.budget.give_back(charged)
