"""A bounded fan-out: work items queued without waiting, handled by a bounded number of tasks.

Every module that runs functions for events it does not wait on uses this one
implementation: change triggers (:mod:`iii.modules._events`), pubsub
deliveries and ``log`` triggers.  Its rules:

* :meth:`FanOut.offer` (sync, never waits) queues an item; it returns False
  when ``queue_size`` items are already waiting (or the fan-out is closed),
  and the caller decides what a dropped item means (a warning, a counter).
  A producer is never slowed down by the handlers.
* :meth:`FanOut.run` takes items in the order they were offered, each only
  once one of ``concurrency`` slots is free, and gives it its own task: at
  most ``queue_size`` items wait and ``concurrency`` run, whatever the offer
  rate.
* Each handler runs contained (:mod:`iii.containment`): an unexpected
  exception ends that item only, logged once with ``describe(item)``.

Lifetime: :meth:`FanOut.run` runs in the owning module's nursery; cancelling
it cancels the handlers in flight and drops the items still queued.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
import trio

from iii.containment import start_contained

__all__ = ["FanOut"]

T = TypeVar("T")


@attrs.define(eq=False)
class FanOut(Generic[T]):
    handle: Callable[[T], Awaitable[None]]
    describe: Callable[[T], str]
    queue_size: int
    concurrency: int
    # Items refused by offer() because the queue was full.
    dropped: int = 0
    running: int = 0
    _send: trio.MemorySendChannel[T] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[T] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[T](self.queue_size)

    @property
    def queued(self) -> int:
        return self._send.statistics().current_buffer_used

    def offer(self, item: T) -> bool:
        """Queue ``item`` without waiting; False when the queue is full or closed."""
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        """Refuse further items; :meth:`run` returns once the queued ones have started."""
        self._send.close()

    async def run(self) -> None:
        slots = trio.Semaphore(self.concurrency)
        async with trio.open_nursery() as handlers:
            while True:
                # A slot first, then an item: no item is held outside the queue.
                await slots.acquire()
                try:
                    item = await self._receive.receive()
                except trio.EndOfChannel:
                    slots.release()
                    return
                self.running += 1
                start_contained(handlers, self.describe(item), self._handle_one, item, slots)

    async def _handle_one(self, item: T, slots: trio.Semaphore) -> None:
        try:
            await self.handle(item)
        finally:
            self.running -= 1
            slots.release()
