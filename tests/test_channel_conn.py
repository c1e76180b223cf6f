"""Channel sockets (``/ws/channels/{id}``, :mod:`iii.channel_conn`) against a raw client.

The relay itself is covered in ``tests/test_engine.py``; here, a client that
misbehaves at the close.
"""

from __future__ import annotations

import pytest
import trio
import wsproto
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request
from wsproto.utilities import LocalProtocolError

from iii.testing import connect_test_worker, make_config, open_test_engine


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


async def _channel_refs(worker) -> tuple[dict, dict]:
    reply = await worker.call("engine::channels::create", {"buffer_size": 16})
    return reply["result"]["writer"], reply["result"]["reader"]


async def test_a_channel_is_removed_as_soon_as_both_sides_finish():
    """Not at the sweep: its memory and its slot are given back at once (issue 10 row 8)."""
    from trio_websocket import ConnectionClosed

    async with open_test_engine(make_config()) as engine, connect_test_worker(engine) as worker:
        writer_ref, reader_ref = await _channel_refs(worker)
        base = f"/ws/channels/{writer_ref['channel_id']}"
        async with connect_test_worker(
            engine, f"{base}?key={writer_ref['access_key']}&dir=write", handshake=False
        ) as writer:
            for frame in [b"a" * 1000, "text", b"b" * 1000]:
                await writer.ws.send_message(frame)
        assert engine.channels.buffered_bytes > 2000  # waiting for the reader
        async with connect_test_worker(
            engine, f"{base}?key={reader_ref['access_key']}&dir=read", handshake=False
        ) as reader:
            got = [await reader.ws.get_message() for _ in range(3)]
            with trio.fail_after(5), pytest.raises(ConnectionClosed):
                await reader.ws.get_message()
        assert got == [b"a" * 1000, "text", b"b" * 1000]
        with trio.fail_after(5):
            while writer_ref["channel_id"] in engine.channels.channels:
                await trio.sleep(0.01)
        assert engine.channels.buffered_bytes == 0 and len(engine.channels) == 0


async def test_creating_a_channel_past_max_channels_is_a_clear_error():
    config = make_config(max_channels=2)
    async with open_test_engine(config) as engine, connect_test_worker(engine) as worker:
        first_writer, first_reader = await _channel_refs(worker)
        await _channel_refs(worker)
        refused = await worker.call("engine::channels::create", {})
        assert refused["error"]["code"] == "too_many_channels"
        assert "max_channels" in refused["error"]["message"]
        # Using a channel up frees its slot at once.
        base = f"/ws/channels/{first_writer['channel_id']}"
        for ref, direction in ((first_writer, "write"), (first_reader, "read")):
            path = f"{base}?key={ref['access_key']}&dir={direction}"
            async with connect_test_worker(engine, path, handshake=False):
                pass
        with trio.fail_after(5):
            while len(engine.channels) == 2:
                await trio.sleep(0.01)
        assert "result" in await worker.call("engine::channels::create", {})
