"""The worker socket's writer keeps the invariants its docstring states (iii/frame_writer.py).

Each test runs a real WebSocket pair (trio-websocket on both ends) over
in-memory streams: ``memory_stream_pair`` where the peer reads freely,
``lockstep_stream_pair`` where a write waits for the peer to read, so a peer
that reads nothing blocks the writer as a real slow consumer does.  Time is
trio's autojump clock, so timeouts are exact and nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from iii.errors import FrameTooLargeError
from iii.frame_writer import CloseReason, DropCause, FrameWriter

TIMEOUT = 30.0


@asynccontextmanager
async def socket_pair(
    make_streams: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    *,
    client_queue: int = 1,
) -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """(engine side, worker side) of one WebSocket over in-memory streams."""
    server_stream, client_stream = make_streams()
    async with trio.open_nursery() as nursery:
        sides: dict[str, WebSocketConnection] = {}

        async def serve() -> None:
            request = await wrap_server_stream(nursery, server_stream, max_message_size=2**24)
            sides["server"] = await request.accept()

        async def connect() -> None:
            sides["client"] = await wrap_client_stream(
                nursery,
                client_stream,  # type: ignore[arg-type]
                "localhost",
                "/",
                message_queue_size=client_queue,
                max_message_size=2**24,
            )

        async with trio.open_nursery() as handshake:
            handshake.start_soon(serve)
            handshake.start_soon(connect)
        yield sides["server"], sides["client"]
        nursery.cancel_scope.cancel()


def writer_for(
    ws: WebSocketConnection, drops: list[CloseReason | None], **kw: object
) -> FrameWriter:
    options: dict[str, object] = {"queue_size": 64, "write_timeout": TIMEOUT, "frame_limit": 2**24}
    options.update(kw)
    return FrameWriter(ws, on_drop=drops.append, **options)  # type: ignore[arg-type]


async def test_frames_arrive_in_the_order_they_were_handed_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    drops: list[CloseReason | None] = []
    handed: list[str] = []
    most_unwritten = 0
    async with socket_pair(trio.testing.memory_stream_pair) as (engine_side, worker_side):
        writer = writer_for(engine_side, drops, queue_size=4096)  # send_nowait never finds it full

        async def producer(name: str, count: int, nowait_every: int) -> None:
            nonlocal most_unwritten
            for n in range(count):
                frame = f"{name}:{n}"
                handed.append(frame)  # handed over now: no checkpoint before the call
                if n % nowait_every == 0:
                    writer.send_nowait(frame)
                else:
                    await writer.send(frame)
                most_unwritten = max(most_unwritten, writer.unwritten)
                if n % 3 == 0:
                    await trio.lowlevel.checkpoint()

        received: list[str] = []
        total = 8 * 200

        all_read = trio.Event()

        async def read_all() -> None:
            while len(received) < total:
                message = await worker_side.get_message()
                assert isinstance(message, str)
                received.append(message)
            all_read.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            nursery.start_soon(read_all)
            async with trio.open_nursery() as producers:
                for index, name in enumerate("abcdefgh"):
                    producers.start_soon(producer, name, 200, 2 + index % 4)
            with trio.move_on_after(TIMEOUT / 2):
                await all_read.wait()
            assert (len(received), drops) == (total, [])
            writer.close()
    assert received == handed
    assert most_unwritten > 1, "the queued path was never taken"
    assert drops == []


async def test_a_direct_write_blocked_past_the_timeout_drops_the_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    drops: list[CloseReason | None] = []
    async with socket_pair(trio.testing.lockstep_stream_pair, client_queue=0) as (engine, _worker):
        writer = writer_for(engine, drops)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            started = trio.current_time()
            for n in range(3):  # the worker's reader takes the first frames, then waits
                await writer.send("x" * 100_000 + str(n))
            assert drops == [CloseReason(DropCause.SLOW_WRITE, f"for {TIMEOUT:g}s")]
            assert trio.current_time() - started == pytest.approx(TIMEOUT)
            writer.send_nowait("after the drop")  # dropped quietly: the connection is going
            assert drops == [CloseReason(DropCause.SLOW_WRITE, f"for {TIMEOUT:g}s")]


async def test_a_full_queue_drops_the_worker(autojump_clock: trio.testing.MockClock) -> None:
    drops: list[CloseReason | None] = []
    async with socket_pair(trio.testing.lockstep_stream_pair, client_queue=0) as (engine, _worker):
        writer = writer_for(engine, drops, queue_size=2, write_timeout=1e6)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            nursery.start_soon(writer.send, "y" * 100_000)  # blocks: direct, never read
            await trio.testing.wait_all_tasks_blocked()
            for n in range(4):  # the writer takes one, the queue holds two
                writer.send_nowait(f"queued {n}")
                await trio.testing.wait_all_tasks_blocked()
            assert drops == [CloseReason(DropCause.QUEUE_FULL)]
            nursery.cancel_scope.cancel()


async def test_an_async_sender_waits_for_room_then_drops_the_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    drops: list[CloseReason | None] = []
    async with socket_pair(trio.testing.lockstep_stream_pair, client_queue=0) as (engine, _worker):
        writer = writer_for(engine, drops, queue_size=1, write_timeout=5.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.send, "z" * 100_000)  # direct, blocks
            await trio.testing.wait_all_tasks_blocked()
            writer.send_nowait("fills the queue")  # no writer task runs: it stays queued
            started = trio.current_time()
            await writer.send("waits for room")
            assert trio.current_time() - started == pytest.approx(5.0)
            assert CloseReason(DropCause.QUEUE_FULL, "for 5s") in drops
            nursery.cancel_scope.cancel()


async def test_a_cancelled_caller_never_leaves_half_a_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    drops: list[CloseReason | None] = []
    big = "b" * 300_000
    async with socket_pair(trio.testing.lockstep_stream_pair, client_queue=0) as (engine, worker):
        writer = writer_for(engine, drops)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.send("first")  # the worker's reader holds it: nothing more is read
            caller = trio.CancelScope()

            async def call() -> None:
                with caller:  # a call whose deadline passes mid-write
                    await writer.send(big)

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert writer.unwritten == 1  # the big frame is on its way, blocked
            caller.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert writer.unwritten == 1  # still being written: the caller's cancel is shielded
            writer.send_nowait("next")
            assert await worker.get_message() == "first"
            assert await worker.get_message() == big
            assert await worker.get_message() == "next"
            writer.close()
    assert drops == []


async def test_close_ends_a_direct_write_blocked_on_a_peer_that_reads_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    drops: list[CloseReason | None] = []
    async with socket_pair(trio.testing.lockstep_stream_pair, client_queue=0) as (engine, _worker):
        writer = writer_for(engine, drops, write_timeout=3600.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            for _ in range(2):  # the worker's reader takes the first, then waits
                nursery.start_soon(writer.send, "w" * 100_000)
                await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()
            writer.close()  # engine shutdown
            await trio.testing.wait_all_tasks_blocked()
            assert writer.unwritten == 0
            assert trio.current_time() == started  # not a second later
            nursery.cancel_scope.cancel()
    assert drops == []  # our own close is not a drop


async def test_the_frame_limit_counts_bytes_not_characters() -> None:
    drops: list[CloseReason | None] = []
    async with socket_pair(trio.testing.memory_stream_pair) as (engine, _worker):
        writer = writer_for(engine, drops, frame_limit=10)
        with pytest.raises(FrameTooLargeError):
            writer.send_nowait("é" * 6)  # 6 characters, 12 bytes
        writer.send_nowait("é" * 5)  # 10 bytes: fits
        writer.send_nowait("x" * 10)
        assert writer.unwritten == 2 and drops == []


async def test_an_oversized_frame_is_refused_before_anything_is_written() -> None:
    drops: list[CloseReason | None] = []
    async with socket_pair(trio.testing.memory_stream_pair) as (engine, _worker):
        writer = writer_for(engine, drops, frame_limit=10)
        with pytest.raises(FrameTooLargeError):
            await writer.send("x" * 11)
        with pytest.raises(FrameTooLargeError):
            writer.send_nowait("x" * 11)
        assert writer.unwritten == 0 and drops == []


def test_close_reasons_read_as_before() -> None:
    assert str(CloseReason(DropCause.NO_PONG, "within 5s")) == "no pong within 5s"
    assert str(CloseReason(DropCause.QUEUE_FULL)) == "slow consumer: send queue full"
    assert str(CloseReason(DropCause.SHUTDOWN)) == "engine shutdown"
