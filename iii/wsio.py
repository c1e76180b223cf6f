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

from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, TextMessage

from iii.wsconnection import GuardedConnection

__all__ = ["send_frames", "receive_frames"]


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
