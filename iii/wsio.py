"""Batched writes on a trio-websocket connection.

``WebSocketConnection.send_message`` writes each message with its own
``send_all`` under the connection's stream lock: one system call and several
task switches per message.  Under load a worker's send queue holds many
frames at once; :func:`send_frames` encodes them all with the connection's
wsproto state and writes them in one ``send_all``.  On a 2-core machine this
is the difference between the engine keeping up with its workers or not (see
``bench/bench_core.py``).

It uses private attributes of trio-websocket's connection (``_wsproto``,
``_stream``, ``_stream_lock``, ``_close_reason``), the same ones its own
``_send`` uses; if a future trio-websocket lacks them, it falls back to one
``send_message`` per frame.  (The dependency is pinned to the versions
whose private surface we know: see :mod:`iii.wsconnection`.)
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import termios
from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, TextMessage

from iii.wsconnection import GuardedConnection

__all__ = ["send_frames", "receive_frames", "write_nowait"]


_PRIVATE = ("_wsproto", "_stream", "_stream_lock", "_close_reason")
# By connection class: its instances have the private attributes (set in __init__).
_SUPPORTED: dict[type, bool] = {}


def _batching_supported(ws: WebSocketConnection) -> bool:
    kind = type(ws)
    supported = _SUPPORTED.get(kind)
    if supported is None:
        supported = _SUPPORTED[kind] = all(hasattr(ws, name) for name in _PRIVATE)
    return supported


async def send_frames(ws: WebSocketConnection, frames: Sequence[str | bytes]) -> None:
    """Send ``frames`` in order, as few writes as possible; raises ConnectionClosed."""
    if not _batching_supported(ws):
        for frame in frames:
            await ws.send_message(frame)
        return
    if ws._close_reason or ws._wsproto.state is not ConnectionState.OPEN:
        # (wsproto would refuse a message once a Close is out either way.)
        raise ConnectionClosed(ws._close_reason)
    encode = ws._wsproto.send
    if len(frames) == 1:
        frame = frames[0]
        data = encode(
            TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame)
        )
    else:
        data = b"".join(
            encode(TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame))
            for frame in frames
        )
    # Under the connection's own send lock, as trio-websocket's ``_send``.  No
    # write straight to the socket when the lock is free: it would skip the
    # scheduler pass in which other tasks queue frames for the next batch,
    # and workers would get more, smaller writes (bench_rest at 32
    # connections: 2,606 -> 2,370 req/s, worker CPU per request 175 -> 246 us).
    async with ws._stream_lock:
        await _send_all(ws, data)


# A frame written at once by write_nowait is at most this large (and the
# socket's send queue is empty), so that the kernel takes it whole.
DIRECT_WRITE_MAX = 16 * 1024
_OUTQ = struct.pack("i", 0)


def write_nowait(ws: WebSocketConnection, frame: str) -> bool:
    """Write one text frame to the socket now, from synchronous code; False
    (nothing written) unless that is sure to take it whole without waiting.

    Only on a plain TCP socket (not TLS) that nothing else is writing to,
    whose send queue is empty, for a frame of at most
    :data:`DIRECT_WRITE_MAX` bytes: the kernel then takes it whole.  Should
    it not (the system short of socket memory), the connection is shut down,
    since its stream would be cut mid-frame.  Saves the hand-off to a writer
    task and its scheduler pass (the cluster's relayed calls use it).
    """
    if len(frame) * 4 > DIRECT_WRITE_MAX and len(frame.encode()) > DIRECT_WRITE_MAX:
        return False
    if not _batching_supported(ws) or sys.platform != "linux":
        return False
    stream = getattr(ws._stream, "_inner", ws._stream)  # (iii.client's upgrade guard)
    if (
        type(stream) is not trio.SocketStream
        or ws._stream_lock.locked()
        or ws._close_reason
        or ws._wsproto.state is not ConnectionState.OPEN
    ):
        return False
    fd = stream.socket.fileno()
    try:
        if struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, _OUTQ))[0]:
            return False  # bytes not yet taken by the peer: this one could wait
        data = ws._wsproto.send(TextMessage(data=frame))
        sent = os.write(fd, data)
    except OSError:
        return False  # (a broken socket: the writer finds out, and reports it)
    if sent != len(data):
        stream.socket.shutdown(trio.socket.SHUT_RDWR)  # cut mid-frame: it cannot go on
    return True


async def _send_all(ws: WebSocketConnection, data: bytes | memoryview) -> None:
    try:
        await ws._stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
        raise ConnectionClosed(ws._close_reason) from None


async def receive_frames(ws: WebSocketConnection) -> list[str | bytes]:
    """Wait for the next message, then take every message already received.

    Saves a scheduler round trip per message when a peer sends in bursts.
    On our server's connections (:class:`~iii.wsconnection.GuardedConnection`)
    the messages taken leave its inbound byte count; on others it reads
    trio-websocket's private receive queue (``_recv_channel``) for the
    non-blocking part.  Raises ConnectionClosed like ``get_message``.
    """
    frames = [await ws.get_message()]
    if isinstance(ws, GuardedConnection):
        ws.get_ready_messages(frames)
        return frames
    queue = getattr(ws, "_recv_channel", None)
    if queue is None:
        return frames
    while True:
        try:
            frames.append(queue.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return frames
