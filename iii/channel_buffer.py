"""A channel's frame buffer, bounded in frames and in bytes, and the engine-wide byte budget.

Each streaming channel (:mod:`iii.channels`) carries its frames through one
:class:`FrameBuffer`: a queue with a writing end (:class:`FrameWriter`) and a
reading end (:class:`FrameReader`) that behave like trio's memory channels
(``send`` / ``receive`` / ``async for`` / ``close``, the same exceptions),
except that the room is counted in bytes as well as in frames:

* a frame counts for the memory its object takes (``sys.getsizeof``: its
  length plus about 33 bytes for ``bytes``, 49 to 76 for ``str``, whose
  characters take 1, 2 or 4 bytes each);
* a writer waits (backpressure) while its frame would take the channel past
  ``max_frames`` frames or ``max_bytes`` bytes, or all channels together past
  the shared :class:`ByteBudget`;
* a frame larger than ``max_bytes`` is taken when the channel's buffer is
  empty, alone: so a channel holds at most ``max(max_bytes, one frame)``, and
  a single frame is already bounded by ``max_message_size``.  The same rule
  holds engine-wide: a frame that does not fit in what is left of the budget
  waits until it fits or nothing at all is buffered.  Neither can deadlock: the
  frame waits only for frames that its reader, or other channels' readers,
  can take;
* when the reader closes, the buffered frames are dropped and their bytes go
  back to the budget at once; a waiting writer gets ``BrokenResourceError``.
  When the writer closes, the frames stay for the reader, then end-of-stream.

Lifetime: a buffer lives as long as its channel; its bytes are returned when
its frames are read or when its reader end is closed (the channel's removal
closes both ends).
"""

from __future__ import annotations

import sys
from collections import deque

import attrs
import trio

__all__ = ["ByteBudget", "FrameBuffer", "FrameReader", "FrameWriter", "Frame", "frame_cost"]

Frame = str | bytes


def frame_cost(frame: Frame) -> int:
    """The bytes a frame counts for: the memory of its object."""
    return sys.getsizeof(frame)


@attrs.define(eq=False)
class ByteBudget:
    """Bytes buffered by all channels together, and the writers waiting for room."""

    limit: int
    used: int = 0
    # Buffers with a writer waiting for room engine-wide: woken on any release.
    _waiting: set[FrameBuffer] = attrs.field(factory=set)

    def fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def release(self, size: int) -> None:
        self.used -= size
        if self._waiting:
            waiting, self._waiting = self._waiting, set()
            for buffer in waiting:
                buffer.wake_writer()

    def wait_for_room(self, buffer: FrameBuffer) -> None:
        self._waiting.add(buffer)

    def stop_waiting(self, buffer: FrameBuffer) -> None:
        self._waiting.discard(buffer)


class FrameBuffer:
    """The queue between one channel's writer and its reader (see the module docstring)."""

    def __init__(self, *, max_frames: int, max_bytes: int, budget: ByteBudget):
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.budget = budget
        self.frames: deque[tuple[Frame, int]] = deque()
        self.buffered_bytes = 0
        self.writer_closed = False
        self.reader_closed = False
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._reader_lot = trio.lowlevel.ParkingLot()
        self.writer = FrameWriter(self)
        self.reader = FrameReader(self)

    # -- writing ------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.writer_closed:
            raise trio.ClosedResourceError("the channel's writer is closed")
        if self.reader_closed:
            raise trio.BrokenResourceError("the channel's reader is gone")

    def _fits_here(self, size: int) -> bool:
        if not self.frames:
            return True  # one frame of any size: see the module docstring
        return len(self.frames) < self.max_frames and self.buffered_bytes + size <= self.max_bytes

    def put_nowait(self, frame: Frame) -> None:
        self._check_writable()
        size = frame_cost(frame)
        if not self._fits_here(size) or not self.budget.fits(size):
            raise trio.WouldBlock
        self._append(frame, size)

    async def put(self, frame: Frame) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        size = frame_cost(frame)
        while True:
            self._check_writable()
            if not self._fits_here(size):
                await self._writer_lot.park()
            elif not self.budget.fits(size):
                self.budget.wait_for_room(self)
                try:
                    await self._writer_lot.park()
                finally:
                    self.budget.stop_waiting(self)
            else:
                break
        self._append(frame, size)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _append(self, frame: Frame, size: int) -> None:
        self.frames.append((frame, size))
        self.buffered_bytes += size
        self.budget.used += size
        self._reader_lot.unpark_all()

    def wake_writer(self) -> None:
        self._writer_lot.unpark_all()

    def close_writer(self) -> None:
        self.writer_closed = True
        self._reader_lot.unpark_all()  # a waiting reader gets the end of stream
        self._writer_lot.unpark_all()

    # -- reading ------------------------------------------------------------------

    def _take(self) -> Frame:
        frame, size = self.frames.popleft()
        self.buffered_bytes -= size
        self.budget.release(size)
        self._writer_lot.unpark_all()
        return frame

    def get_nowait(self) -> Frame:
        if self.reader_closed:
            raise trio.ClosedResourceError("the channel's reader is closed")
        if self.frames:
            return self._take()
        if self.writer_closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def get(self) -> Frame:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                frame = self.get_nowait()
            except trio.WouldBlock:
                await self._reader_lot.park()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return frame

    def close_reader(self) -> None:
        """Drop what is buffered and give its bytes back; a writer gets BrokenResourceError."""
        self.reader_closed = True
        self.frames.clear()
        released, self.buffered_bytes = self.buffered_bytes, 0
        self.budget.release(released)
        self._writer_lot.unpark_all()
        self._reader_lot.unpark_all()


@attrs.define(eq=False)
class FrameWriter:
    """The writing end: ``send`` waits for room, ``send_nowait`` raises WouldBlock."""

    buffer: FrameBuffer

    async def send(self, frame: Frame) -> None:
        await self.buffer.put(frame)

    def send_nowait(self, frame: Frame) -> None:
        self.buffer.put_nowait(frame)

    def close(self) -> None:
        self.buffer.close_writer()


@attrs.define(eq=False)
class FrameReader:
    """The reading end: ``receive`` or ``async for``; EndOfChannel after the writer closed."""

    buffer: FrameBuffer

    async def receive(self) -> Frame:
        return await self.buffer.get()

    def receive_nowait(self) -> Frame:
        return self.buffer.get_nowait()

    def close(self) -> None:
        self.buffer.close_reader()

    def __aiter__(self) -> FrameReader:
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self.buffer.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
