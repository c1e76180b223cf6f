"""The side tasks of one HTTP request, in a nursery opened only when needed.

A routed request may need tasks beside its own: the body feeder and the
response reader (:mod:`iii.modules.rest_api.dispatch`), started only when
the function opens a channel, which most functions never do.  Opening a
nursery in every request just in case costs a cancel scope and, when it
closes empty, a scheduler pass: about 25 us of the engine's 360 us per
routed request (``bench/bench_rest.py`` at 32 connections).

So a request's side tasks run in a nursery that a host task opens on first
use, in the REST dispatcher's own nursery (``parent``: opened by
:meth:`RestDispatcher.run <iii.modules.rest_api.dispatch.RestDispatcher.run>`,
never the HTTP server's).  They have no deadline of their own: the request
waits for them under its deadline (:mod:`.exchange`).  The request joins them
(:meth:`SideTasks.join`) before it returns: no side task outlives its
request, a request that is cancelled takes its side tasks down first, and an
exception in one is re-raised, once, in the request's task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

__all__ = ["SideTasks"]


@attrs.define(eq=False)
class SideTasks:
    parent: trio.Nursery  # where the host task runs (the dispatcher's nursery)
    _nursery: trio.Nursery | None = None
    _queued: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = attrs.field(factory=list)
    _cancelled: bool = False
    _closed: bool = False
    # Made with the host task: a request whose function opens no channel
    # costs only this object.
    _closing: trio.Event | None = None
    _done: trio.Event | None = None
    _failure: BaseException | None = None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._closed:
            raise RuntimeError("the request's side tasks are closed")
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)
            return
        self._queued.append((fn, args))
        if self._done is None:
            self._closing, self._done = trio.Event(), trio.Event()
            self.parent.start_soon(self._host, self._closing, self._done)

    def cancel(self) -> None:
        self._cancelled = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def join(self) -> None:
        """No more tasks: wait for the running ones; re-raise a failure of one.

        If the request is cancelled while it waits, its side tasks are
        cancelled and waited for (shielded) before the cancellation goes on.
        """
        self._closed = True
        done = self._done
        if done is None:
            return  # no side task was ever started
        assert self._closing is not None
        self._closing.set()
        if not done.is_set():
            try:
                await done.wait()
            finally:
                if not done.is_set():
                    self.cancel()
                    with trio.CancelScope(shield=True):
                        await done.wait()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def _host(self, closing: trio.Event, done: trio.Event) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self._cancelled:
                    nursery.cancel_scope.cancel()
                self._nursery = nursery
                for fn, args in self._queued:
                    nursery.start_soon(fn, *args)
                self._queued.clear()
                await closing.wait()  # more may come until the request ends
        except Exception as exc:
            self._failure = exc  # re-raised in the request (join)
        finally:
            self._nursery = None
            done.set()
