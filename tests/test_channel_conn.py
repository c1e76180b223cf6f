"""Channel sockets (``/ws/channels/{id}``, :mod:`iii.channel_conn`) against a raw client.

The relay itself is covered in ``tests/test_engine.py``; here, a client that
misbehaves at the close.
"""

from __future__ import annotations

import trio
import wsproto
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request
from wsproto.utilities import LocalProtocolError

from iii.testing import make_config, open_test_engine


async def _upgrade(port: int, target: str) -> tuple[trio.SocketStream, wsproto.WSConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target=target)))
    while True:
        ws.receive_data(await stream.receive_some(4096))
        if any(isinstance(event, AcceptConnection) for event in ws.events()):
            return stream, ws


async def test_a_client_that_never_answers_the_close_does_not_hold_the_socket():
    async with open_test_engine(make_config()) as engine:
        channel = engine.channels.create()
        channel.claim_writer()  # the engine writes: a socket asking for that side is closed
        target = f"/ws/channels/{channel.channel_id}?key={channel.access_key}&dir=write"
        stream, ws = await _upgrade(engine.listen_port, target)
        async with stream:
            with trio.fail_after(10):
                closing = False
                while not closing:
                    ws.receive_data(await stream.receive_some(4096))
                    closing = any(isinstance(event, CloseConnection) for event in ws.events())
            # ... and the client never answers the Close, nor closes its socket.
            with trio.fail_after(20):
                while engine.open_sockets:
                    await trio.sleep(0.05)


async def test_a_reader_that_stops_reading_is_closed_and_so_is_the_writer(monkeypatch):
    """Both sockets of a channel would otherwise wait forever on a peer that
    takes no more frames: the reader is closed after the stall timeout, then
    the writer learns the reader is gone."""
    monkeypatch.setattr("iii.channel_conn.STALL_TIMEOUT", 0.5)
    async with open_test_engine(make_config()) as engine:
        channel = engine.channels.create()
        target = f"/ws/channels/{channel.channel_id}?key={channel.access_key}&dir="
        reader, _ = await _upgrade(engine.listen_port, target + "read")
        writer, ws = await _upgrade(engine.listen_port, target + "write")
        async with reader, writer:  # the reader never reads after the upgrade
            chunk = b"x" * (256 * 1024)

            async def keep_writing():
                try:
                    while True:
                        await writer.send_all(ws.send(BytesMessage(data=chunk)))
                except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                    return  # the engine closed the writer

            reason = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_writing)
                with trio.fail_after(30):
                    while reason is None:
                        data = await writer.receive_some(65536)
                        if not data:
                            break
                        ws.receive_data(data)
                        for event in ws.events():
                            if isinstance(event, CloseConnection):
                                reason = event.reason
                nursery.cancel_scope.cancel()
            assert reason == "channel reader closed"
            with trio.fail_after(10):
                while not channel.finished:
                    await trio.sleep(0.05)
