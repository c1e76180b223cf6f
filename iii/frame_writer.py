"""The one writer of a worker's WebSocket: every frame the engine sends a worker goes here.

A :class:`FrameWriter` owns the outgoing side of one worker socket.  Frames
reach it two ways, and both are this class's:

* :meth:`FrameWriter.send` (async).  When nothing is waiting to be written,
  the calling task writes its frame itself (the *direct* path: no handoff to
  the writer task, which at low load halves the scheduler passes per call);
  otherwise the frame is queued.
* :meth:`FrameWriter.send_nowait` (sync code): always queued.
* :meth:`FrameWriter.offer_nowait` (sync code, the cluster's relayed calls):
  when nothing is waiting to be written and the frame is small, written at
  once without blocking (:func:`iii.wsio.write_nowait`, which checks the
  socket's lock, so it never lands inside another write); then a marker is
  queued behind it, so frames offered later in the same scheduler pass queue
  and go out in one batch.  Else queued; False when the queue is full.

Queued frames are written by :meth:`FrameWriter.run`, the writer task, which
takes every frame queued in the same wave and writes them in one system call.

Invariants (each has a test in ``tests/test_frame_writer.py``):

1. **Order.**  Frames reach the socket in the order they were handed over
   (the order of the ``send``/``send_nowait`` calls).  ``unwritten`` counts
   frames handed over and not yet written; the direct path is taken only when
   it is 0, so a direct frame never overtakes a queued one.  Every write,
   direct or batched, holds ``_write_lock`` (a :class:`trio.StrictFIFOLock`,
   first come first served), and the direct path takes it without a
   checkpoint (:meth:`trio.StrictFIFOLock.acquire_nowait`), so the writer
   task, which can only hold a later frame, writes after it.  Nothing depends
   on trio-websocket's private socket lock.
2. **A slow consumer is dropped, never waited on forever.**  A direct write
   that blocks longer than ``write_timeout``, a queue that stays full for
   ``write_timeout``, or a full queue met by ``send_nowait`` calls
   ``on_drop`` with the :class:`CloseReason`; the connection then ends.  The
   writer task's own write is bounded the same way.
3. **A cancelled caller never leaves half a frame.**  The direct write runs
   shielded from the caller's cancellation (the caller may be a call whose
   deadline passed); only its own deadline or :meth:`close` ends it.
4. **Shutdown does not wait on a blocked write.**  :meth:`close` stops
   intake (later frames are dropped: the connection is going away and its
   cleanup answers everyone) and cancels a direct write in progress, so a
   connection stuck writing to a peer that reads nothing ends at once.

What happens to the socket after a drop (a close frame or an abort) is the
connection's business (:mod:`iii.worker_conn`): the writer only reports.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.errors import FrameTooLargeError
from iii.wsio import send_frames, write_nowait

__all__ = ["CloseReason", "DropCause", "FrameWriter", "WRITE_BATCH"]

# At most this many frames go out in one write.
WRITE_BATCH = 256


class DropCause(enum.Enum):
    """Why the engine ended a worker's connection (the peer closing it is not one)."""

    SLOW_WRITE = "slow consumer: a write blocked"
    QUEUE_FULL = "slow consumer: send queue full"
    NO_PONG = "no pong"
    REPLACED = "replaced by its reconnection"
    SHUTDOWN = "engine shutdown"


@attrs.frozen
class CloseReason:
    """A :class:`DropCause` and its detail (a duration, the replacing worker's id)."""

    cause: DropCause
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.cause.value} {self.detail}" if self.detail else self.cause.value


# Queued after a frame offer_nowait wrote at once; never written (no frame is empty).
PASS_MARK = ""


@attrs.define(eq=False)
class FrameWriter:
    ws: WebSocketConnection
    queue_size: int
    write_timeout: float
    # Called once when the writer gives up: with the reason, or None when the
    # socket closed under a write (the peer, or the connection's own close).
    on_drop: Callable[[CloseReason | None], None]
    frame_limit: int
    # Frames handed over and not written yet: queued, being written in a batch,
    # or being written directly.
    unwritten: int = 0
    _closed: bool = False
    _write_lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)
    _direct_scope: trio.CancelScope | None = None
    _queue_send: trio.MemorySendChannel[str] = attrs.field(init=False)
    _queue_receive: trio.MemoryReceiveChannel[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._queue_send, self._queue_receive = trio.open_memory_channel[str](self.queue_size)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or the writer dropped): frames are dropped."""
        return self._closed

    def check_size(self, frame: str) -> None:
        """The limit counts bytes: a character may take up to 4 in UTF-8, so a
        frame that is not ASCII and could pass the limit is measured encoded."""
        size = len(frame)
        if size * 4 > self.frame_limit and size <= self.frame_limit and not frame.isascii():
            size = len(frame.encode("utf-8", "surrogatepass"))
        if size > self.frame_limit:
            raise FrameTooLargeError(
                f"message of {size} bytes or more exceeds this worker's limit of {self.frame_limit}"
            )

    # -- intake ----------------------------------------------------------------

    async def send(self, frame: str) -> None:
        """Write ``frame`` now if nothing is ahead of it, else queue it (invariants 1-3).

        Raises :class:`FrameTooLargeError` for a frame over ``frame_limit``;
        returns quietly once the connection is closing or dropped.
        """
        self.check_size(frame)
        if self._closed:
            return
        if self.unwritten == 0:
            await self._write_direct(frame)
            return
        if self._enqueue_nowait(frame):
            return
        with trio.move_on_after(self.write_timeout):
            try:
                await self._queue_send.send(frame)
                self.unwritten += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            return
        self._drop(DropCause.QUEUE_FULL, f"for {self.write_timeout:g}s")

    def send_nowait(self, frame: str) -> None:
        """Queue ``frame`` from synchronous code; a full queue drops the worker.

        Raises :class:`FrameTooLargeError` for a frame over ``frame_limit``.
        """
        self.check_size(frame)
        if self._closed:
            return
        if not self._enqueue_nowait(frame):
            self._drop(DropCause.QUEUE_FULL)

    def offer_nowait(self, frame: str) -> bool:
        """Queue ``frame`` from synchronous code; False (nothing done) when the
        queue is full, so the caller can wait with :meth:`send` instead.

        Raises :class:`FrameTooLargeError` for a frame over ``frame_limit``.
        """
        self.check_size(frame)
        if self._closed:
            return True
        if self.unwritten == 0 and write_nowait(self.ws, frame):
            # Written (nothing was ahead of it, nothing else writing).  Frames
            # offered later in this scheduler pass queue behind a marker, so
            # the writer task writes them in one batch, not one write each.
            self._enqueue_nowait(PASS_MARK)
            return True
        return self._enqueue_nowait(frame)

    def _enqueue_nowait(self, frame: str) -> bool:
        """Queue ``frame``; False when the queue is full.  A closed queue takes
        (and drops) anything: the connection is going away."""
        try:
            self._queue_send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return True
        self.unwritten += 1
        return True

    async def _write_direct(self, frame: str) -> None:
        # unwritten == 0: nobody holds the write lock, and no frame is ahead.
        self._write_lock.acquire_nowait()
        self.unwritten += 1
        try:
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + self.write_timeout
            ) as scope:
                self._direct_scope = scope
                await send_frames(self.ws, [frame])
        except ConnectionClosed:
            self._drop(None)
            return
        finally:
            self._direct_scope = None
            self.unwritten -= 1
            self._write_lock.release()
        if scope.cancelled_caught and not self._closed:
            self._drop(DropCause.SLOW_WRITE, f"for {self.write_timeout:g}s")

    # -- the writer task -------------------------------------------------------

    async def run(self) -> None:
        """Write queued frames until :meth:`close`; frames queued together go out in one write.

        Returns when the queue is closed or the socket is; a write blocked for
        ``write_timeout`` drops the worker.
        """
        receive = self._queue_receive
        while True:
            try:
                batch = [await receive.receive()]
            except trio.EndOfChannel:
                return
            # Let the tasks that are producing frames right now queue them
            # first, as long as the queue keeps growing: one write (one system
            # call, one wakeup of the peer) for the whole wave.
            while len(batch) < WRITE_BATCH:
                await trio.lowlevel.cancel_shielded_checkpoint()
                before = len(batch)
                while len(batch) < WRITE_BATCH:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if len(batch) == before:
                    break
            try:
                with trio.move_on_after(self.write_timeout) as scope:
                    await self._write_batch(batch)
            except ConnectionClosed:
                self._drop(None)
                return
            finally:
                self.unwritten -= len(batch)
            if scope.cancelled_caught:
                self._drop(DropCause.SLOW_WRITE, f"for {self.write_timeout:g}s")
                return

    async def _write_batch(self, batch: list[str]) -> None:
        # The lock is free unless a direct write started before these frames
        # were queued: then wait for it (first come, first served).  Taken
        # without a checkpoint when free: an extra pass of the scheduler here
        # delays every batch by a whole wave of other tasks (bench_rest at 32
        # connections: p50 11 -> 18 ms).
        try:
            self._write_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            if PASS_MARK in batch:
                batch = [frame for frame in batch if frame]
                if not batch:
                    return
            await send_frames(self.ws, batch)
        finally:
            self._write_lock.release()

    # -- the end ---------------------------------------------------------------

    def close(self) -> None:
        """No more frames (later ones are dropped); a direct write in progress is cancelled."""
        self._closed = True
        self._queue_send.close()
        if self._direct_scope is not None:
            self._direct_scope.cancel()

    def _drop(self, cause: DropCause | None, detail: str = "") -> None:
        """Report the end once: a cause of ours, or None when the socket closed."""
        if self._closed:
            return
        self.close()
        self.on_drop(CloseReason(cause, detail) if cause is not None else None)
