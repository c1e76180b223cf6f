"""One side of a streaming channel served over ``/ws/channels/{id}``.

* An unknown channel id or a wrong key is refused with HTTP 404 ("Channel not
  found") before the upgrade.
* A side already claimed is upgraded and closed at once (upstream behaviour).
* The writer side (``dir=write``) puts every frame, text or binary, into the
  channel's bounded buffer; when it is full the engine stops reading the socket
  (backpressure).  The client's Close ends the stream.
* The reader side (``dir=read``) gets the frames in order with their type kept,
  then a Close when the writer has finished.  A reader that takes no frame
  for ``STALL_TIMEOUT`` seconds while one is waiting for it is closed (1008);
  the writer is then closed too ("channel reader closed"), instead of both
  sockets being held forever by a peer that stopped reading.

Every Close we start is bounded (``CLOSE_TIMEOUT``): a peer that never
answers it loses its socket.

Memory: frames wait in the channel's buffer, bounded in bytes
(:mod:`iii.channel_buffer`).  A writer socket's pump takes one message at a
time, and the socket queues no more than one ahead of it
(:meth:`~iii.wsconnection.GuardedConnection.limit_read_ahead` 0, instead of the
worker port's 64 KiB: those would sit outside the channel's bound), so a
writer that no reader drains holds the channel's bound, the message in the
pump's hands, one queued and one being received, the last two counted in
the engine's ``max_inbound_bytes`` (:mod:`iii.inbound`).

Lifetime: the handler returns when its socket or the channel ends; when the
last side finishes, the channel is removed at once (its memory and its
``max_channels`` slot given back), otherwise by the sweep or with its owner;
removing it ends the sockets still attached to it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.channel_buffer import FrameReader, FrameWriter
from iii.channels import Channel, ChannelClaimedError
from iii.wsserver import Upgrade

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["serve_channel_side"]

log = logging.getLogger(__name__)

# How long a Close handshake may take: a peer that never answers our Close
# must not hold the socket (and its slot in ``max_connections``).
CLOSE_TIMEOUT = 2.0
# How long one frame may wait for a reading peer to take it (see above).
STALL_TIMEOUT = 60.0


async def _close(ws: WebSocketConnection, code: int, reason: str) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(code, reason)


async def serve_channel_side(
    engine: Engine,
    upgrade: Upgrade,
    *,
    channel_id: str,
    access_key: str,
    direction: str,
    credentialed: bool = False,
) -> None:
    """``credentialed``: the channel's key counts as a credential (see :mod:`iii.admission`)."""
    channel = engine.channels.lookup(channel_id, access_key)
    if channel is None or direction not in ("read", "write"):
        await upgrade.reject(404, body=b"Channel not found")
        return
    try:
        if direction == "write":
            send_side = channel.claim_writer()
        else:
            receive_side = channel.claim_reader()
    except ChannelClaimedError:
        ws = await upgrade.accept(credentialed=credentialed)
        await _close(ws, 1008, "channel side already claimed")
        return
    try:
        ws = await upgrade.accept(credentialed=credentialed)
    except BaseException:
        # Not upgraded (503, or the peer left): this side ends unserved.
        if direction == "write":
            send_side.close()
            channel.writer_done = True
        else:
            receive_side.close()
            channel.reader_done = True
        raise
    with trio.CancelScope() as scope:
        channel.socket_scopes.append(scope)
        try:
            if direction == "write":
                ws.limit_read_ahead(0)
                await _pump_from_socket(ws, channel, send_side)
            else:
                await _pump_to_socket(ws, channel, receive_side)
        finally:
            channel.socket_scopes.remove(scope)
            engine.channels.release_if_finished(channel)
    if scope.cancelled_caught:
        await _close(ws, 1000, "channel removed")


async def _pump_from_socket(
    ws: WebSocketConnection, channel: Channel, send_side: FrameWriter
) -> None:
    try:
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed:
                return
            try:
                await send_side.send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The reader went away: nothing more will be read.
                await _close(ws, 1000, "channel reader closed")
                return
    finally:
        send_side.close()
        channel.writer_done = True


async def _pump_to_socket(
    ws: WebSocketConnection, channel: Channel, receive_side: FrameReader
) -> None:
    try:
        async for frame in receive_side:
            with trio.move_on_after(STALL_TIMEOUT) as stalled:
                try:
                    await ws.send_message(frame)
                except ConnectionClosed:
                    return
            if stalled.cancelled_caught:
                log.warning(
                    "channel %s: the reader took no frame for %gs: closed",
                    channel.channel_id,
                    STALL_TIMEOUT,
                )
                await _close(ws, 1008, "channel reader stalled")
                return
        await _close(ws, 1000, "channel closed")
    except trio.ClosedResourceError:
        await _close(ws, 1000, "channel removed")
    finally:
        receive_side.close()
        channel.reader_done = True
