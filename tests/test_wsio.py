"""Batched writes over a real TCP socket (iii/wsio.py): the non-blocking write and its fallback.

On a plain ``trio.SocketStream`` :func:`iii.wsio.send_frames` writes what the
kernel takes at once and sends the rest through ``send_all``.  These tests
run over loopback TCP (the in-memory streams of ``test_frame_writer.py``
never take that path): frames larger than the socket buffers, so the
fallback runs, must arrive whole and in order, and a socket the peer reset
must end in ``ConnectionClosed``, as trio-websocket reports it.  Frames
written at once from synchronous code (:func:`iii.wsio.write_nowait`, through
``FrameWriter.offer_nowait``) keep their order among queued ones.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from iii.frame_writer import CloseReason, FrameWriter
from iii.wsio import DIRECT_WRITE_MAX, send_frames, write_nowait

LIMIT = 2**25
LINGER_0 = struct.pack("ii", 1, 0)


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[
    tuple[WebSocketConnection, WebSocketConnection, trio.SocketStream]
]:
    """(client, server, the server's TCP stream) of one WebSocket over loopback TCP."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    sides: dict[str, WebSocketConnection] = {}
    streams: list[trio.SocketStream] = []
    try:
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                stream = await listeners[0].accept()
                assert isinstance(stream, trio.SocketStream)
                streams.append(stream)
                request = await wrap_server_stream(nursery, stream, max_message_size=LIMIT)
                sides["server"] = await request.accept()

            async def connect() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                streams.append(stream)
                sides["client"] = await wrap_client_stream(
                    nursery, stream, "127.0.0.1", "/", max_message_size=LIMIT
                )

            async with trio.open_nursery() as handshake:
                handshake.start_soon(serve)
                handshake.start_soon(connect)
            server_stream = next(s for s in streams if s.socket.getsockname()[1] == port)
            yield sides["client"], sides["server"], server_stream
            nursery.cancel_scope.cancel()
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
        for listener in listeners:
            await trio.aclose_forcefully(listener)


@pytest.mark.parametrize("batch", [1, 7])
async def test_large_frames_arrive_whole_and_in_order(batch: int) -> None:
    # 4 MiB frames do not fit in loopback's socket buffers: the write is partial
    # and the rest goes through send_all while the peer reads.
    sent: list[str | bytes] = []
    for index in range(21):
        if index % 5 == 0:
            sent.append(bytes([index]) * (4 * 2**20))
        else:
            sent.append(f"frame {index} " + "é" * index)
    received: list[str | bytes] = []
    with trio.fail_after(60):
        async with tcp_pair() as (client, server, _):

            async def read() -> None:
                while len(received) < len(sent):
                    received.append(await server.get_message())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                for start in range(0, len(sent), batch):
                    await send_frames(client, sent[start : start + batch])
    assert received == sent


async def test_a_reset_socket_ends_in_connection_closed() -> None:
    with trio.fail_after(30):
        async with tcp_pair() as (client, _, server_stream):
            # Linger 0: closing sends a reset.
            server_stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, LINGER_0)
            await trio.aclose_forcefully(server_stream)
            with pytest.raises(ConnectionClosed):
                # The first writes may still be taken by the kernel; one meets the reset.
                for _ in range(1000):
                    await send_frames(client, ["after the reset"])
                    await trio.sleep(0.01)


async def test_frames_offered_from_sync_code_keep_their_order() -> None:
    # Small frames go out at once when the socket is idle; the rest queue (behind
    # a large frame still in the kernel's queue, or later in the same pass).
    sent = [f"small {i}" if i % 10 else "x" * (4 * 2**20) + str(i) for i in range(40)]
    received: list[str | bytes] = []
    drops: list[CloseReason | None] = []
    with trio.fail_after(60):
        async with tcp_pair() as (client, server, _):
            assert not write_nowait(client, "y" * (DIRECT_WRITE_MAX + 1))
            writer = FrameWriter(
                client, queue_size=64, write_timeout=30, on_drop=drops.append, frame_limit=LIMIT
            )

            async def read() -> None:
                while len(received) < len(sent):
                    received.append(await server.get_message())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                nursery.start_soon(read)
                for index, frame in enumerate(sent):
                    assert writer.offer_nowait(frame)
                    if index % 3 == 0:
                        await trio.lowlevel.checkpoint()  # a new scheduler pass now and then
                while len(received) < len(sent):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert received == sent
    assert drops == []
