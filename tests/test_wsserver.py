"""iii.wsserver and iii.wsconnection: the supervised WebSocket server, its connection
class, and the trio-websocket surface they need.

Sockets here are in-memory stream pairs (no port) served by
:func:`~iii.wsserver.serve_socket`; the peer is a raw wsproto client.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from importlib.metadata import version
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import wsproto
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, RejectConnection, Request

from iii.admission import Admission, ConnectionLimits
from iii.engine import Engine
from iii.listener import connection_options
from iii.testing import make_config
from iii.wsio import receive_frames
from iii.wsserver import (
    PRIVATE_SURFACE,
    ConnectionOptions,
    GuardedConnection,
    Upgrade,
    serve_socket,
)

# -- the pin -----------------------------------------------------------------------------


def test_trio_websocket_is_a_version_whose_private_surface_we_know() -> None:
    """iii.wsserver and iii.wsio use trio-websocket's private attributes; pyproject.toml
    pins ``>=0.12.2,<0.13``.  Moving the pin means reading the new version's
    ``_impl.py`` against GuardedConnection first (issue #184 may be fixed there)."""
    major, minor, patch = (int(part) for part in version("trio-websocket").split(".")[:3])
    assert (0, 12, 2) <= (major, minor, patch) < (0, 13, 0)


async def test_trio_websocket_private_surface_is_there() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ws = GuardedConnection(server_stream, wsproto.WSConnection(wsproto.ConnectionType.SERVER))
    missing = [name for name in PRIVATE_SURFACE if not hasattr(ws, name)]
    assert not missing, f"trio-websocket no longer has {missing}"

    # The methods GuardedConnection overrides, or calls, keep their shape.
    def parameters(method: Any) -> list[str]:
        return list(inspect.signature(method).parameters)

    assert parameters(WebSocketConnection._handle_ping_event) == ["self", "event"]
    assert parameters(WebSocketConnection._send) == ["self", "event"]
    assert parameters(WebSocketConnection._reader_task) == ["self"]
    assert parameters(WebSocketConnection._get_request) == ["self"]
    assert inspect.iscoroutinefunction(WebSocketConnection._handle_ping_event)
    # The reader looks its handlers up on the instance, so the override is used.
    assert "self._handle_ping_event" in inspect.getsource(WebSocketConnection._reader_task)


# -- a raw peer over a memory stream ---------------------------------------------------------


class Peer:
    def __init__(self, stream: trio.testing.MemoryStream | Any):
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.events: list[Any] = []

    async def send(self, event: Any) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def read_until(self, kind: type, timeout: float = 5.0) -> Any:
        with trio.fail_after(timeout):
            while True:
                for index, event in enumerate(self.events):
                    if isinstance(event, kind):
                        return self.events.pop(index)
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("closed")
                self.ws.receive_data(data)
                self.events.extend(self.ws.events())

    async def eof(self, timeout: float = 5.0) -> None:
        """Wait for the server to close the stream (what it sends meanwhile is kept)."""
        with trio.fail_after(timeout):
            while data := await self.stream.receive_some(65536):
                if self.ws.state is not ConnectionState.CLOSED:
                    self.ws.receive_data(data)
                    self.events.extend(self.ws.events())


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One short final client frame, masked with a zero key."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def limits(max_connections: int = 8, max_per_address: int = 8) -> Admission:
    return Admission(
        ConnectionLimits(max_connections=max_connections, max_per_address=max_per_address)
    )


@asynccontextmanager
async def served(
    handler: Any, admission: Admission | None = None, **options: Any
) -> AsyncIterator[tuple[Peer, trio.Event, Admission]]:
    """A socket served by serve_socket; the event is set when serve_socket returned."""
    admission = admission or limits()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await serve_socket(
            server_stream,
            handler,
            admission=admission,
            options=ConnectionOptions(**options),
            port_name="test port",
        )
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield Peer(client_stream), done, admission
        nursery.cancel_scope.cancel()


async def upgraded(peer: Peer) -> None:
    await peer.send(Request(host="x", target="/"))
    await peer.read_until(AcceptConnection)


# -- GuardedConnection (trio-websocket #184) -----------------------------------------------


async def test_pings_after_our_close_get_no_pong_and_crash_nothing() -> None:
    closing = trio.Event()

    async def handler(upgrade: Upgrade) -> None:
        ws = await upgrade.accept()
        closing.set()
        await ws.aclose(1008, "bye")  # waits for the peer's answer

    async with served(handler) as (peer, done, _):
        await upgraded(peer)
        await peer.read_until(CloseConnection)
        # (Raw frames: the peer's own wsproto would send nothing but its Close now.)
        for _ in range(50):
            await peer.stream.send_all(masked_frame(0x9, b"p"))
        await peer.send(CloseConnection(code=1000))  # the answer, at last
        await peer.eof()
        with trio.fail_after(5):
            await done.wait()
        assert not any(isinstance(event, Pong) for event in peer.events)


async def test_pings_are_answered_while_open() -> None:
    async def handler(upgrade: Upgrade) -> None:
        ws = await upgrade.accept()
        await ws.get_message()

    async with served(handler) as (peer, _, _):
        await upgraded(peer)
        await peer.send(Ping(payload=b"hello"))
        pong = await peer.read_until(Pong)
        assert pong.payload == b"hello"


# -- supervision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ValueError("boom\nCRITICAL forged line"),
        KeyError("k"),
        ExceptionGroup("group", [RuntimeError("one"), TypeError("two")]),
    ],
    ids=["ValueError", "KeyError", "ExceptionGroup"],
)
async def test_a_failing_handler_ends_its_socket_only_logged_once(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="iii.containment")

    async def handler(upgrade: Upgrade) -> None:
        await upgrade.accept()
        raise error

    async with served(handler) as (peer, done, admission):
        await upgraded(peer)
        await peer.eof()  # aborted, no close handshake
        with trio.fail_after(5):
            await done.wait()
        assert admission.open == 0
    [record] = [r for r in caplog.records if r.name == "iii.containment"]
    message = record.getMessage()
    assert message.startswith("test port connection ") and " from memory failed" in message
    assert "\nCRITICAL" not in message  # the exception's text is quoted, never raw


async def test_a_failing_reader_task_ends_its_socket_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handler_running = trio.Event()
    original = GuardedConnection._reader_task

    async def reader_that_breaks(self: GuardedConnection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(original, self)
            await handler_running.wait()
            raise RuntimeError("reader bug")

    monkeypatch.setattr(GuardedConnection, "_reader_task", reader_that_breaks)
    handler_cancelled = trio.Event()

    async def handler(upgrade: Upgrade) -> None:
        await upgrade.accept()
        handler_running.set()
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    async with served(handler) as (peer, done, admission):
        await upgraded(peer)
        await peer.eof()
        with trio.fail_after(5):
            await done.wait()
        assert handler_cancelled.is_set() and admission.open == 0
    [record] = [r for r in caplog.records if r.name == "iii.containment"]
    assert record.getMessage().startswith("test port connection ")
    assert "reader bug" in record.getMessage()


async def test_cancellation_is_never_swallowed() -> None:
    entered = trio.Event()

    async def handler(upgrade: Upgrade) -> None:
        await upgrade.accept()
        entered.set()
        await trio.sleep_forever()

    client_stream, server_stream = trio.testing.memory_stream_pair()
    returned = False
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                nonlocal returned
                await serve_socket(
                    server_stream,
                    handler,
                    admission=limits(),
                    options=ConnectionOptions(),
                    port_name="p",
                )
                returned = True

            nursery.start_soon(serve)
            await upgraded(Peer(client_stream))
            await entered.wait()
            scope.cancel()
    assert scope.cancelled_caught and not returned


async def test_a_socket_that_never_sends_its_request_is_closed_after_the_timeout() -> None:
    async def handler(upgrade: Upgrade) -> None:
        raise AssertionError("no request was sent")

    async with served(handler, handshake_timeout=0.2) as (peer, done, admission):
        await trio.testing.wait_all_tasks_blocked()
        assert admission.handshaking == 1
        await peer.eof()
        with trio.fail_after(5):
            await done.wait()
        assert admission.open == 0


async def test_a_rejected_upgrade_frees_its_slot_and_closes_at_once() -> None:
    async def handler(upgrade: Upgrade) -> None:
        await upgrade.reject(401, body=b"Unauthorized")

    async with served(handler) as (peer, done, admission):
        await peer.send(Request(host="x", target="/"))
        rejected = await peer.read_until(RejectConnection)
        assert rejected.status_code == 401
        await peer.eof()  # the server closed: the peer keeps nothing open
        with trio.fail_after(5):
            await done.wait()
        assert admission.open == 0


async def test_past_max_connections_the_upgrade_is_answered_503() -> None:
    admission = limits(max_connections=1)
    admission.upgraded = 1  # someone holds the only place

    async def handler(upgrade: Upgrade) -> None:
        await upgrade.accept()
        raise AssertionError("upgraded past max_connections")

    async with served(handler, admission) as (peer, done, _):
        await peer.send(Request(host="x", target="/"))
        rejected = await peer.read_until(RejectConnection)
        assert rejected.status_code == 503
        with trio.fail_after(5):
            await done.wait()
    assert admission.open == 1


async def test_a_socket_past_its_address_share_is_refused_before_reading() -> None:
    admission = limits(max_per_address=1)
    admission.admit("memory")  # the address's one place is taken

    async def handler(upgrade: Upgrade) -> None:
        raise AssertionError("served past the address's share")

    async with served(handler, admission) as (peer, done, _):
        with trio.fail_after(5):
            await done.wait()
        response = b""
        while chunk := await peer.stream.receive_some(4096):
            response += chunk
        assert response.startswith(b"HTTP/1.1 503 ")


# -- inbound bytes: what a connection holds ahead of its reader (issue 10 follow-up) ---------

MiB = 1024 * 1024


def held_by_library(ws: WebSocketConnection) -> int:
    """The bytes of peer messages trio-websocket holds for ``ws``, read from its own
    structures (not from our accounting): messages queued for our reader, one handed
    to a blocked ``send``, and the parts of the message being assembled."""
    state = ws._recv_channel._state  # type: ignore[attr-defined]
    queued = sum(sys.getsizeof(message) for message in state.data)
    in_hand = sum(sys.getsizeof(message) for message in state.send_tasks.values())
    partial = sum(sys.getsizeof(part) for part in ws._message_parts)
    return queued + in_hand + partial


def binary_message(length: int) -> bytes:
    """One final masked binary frame (zero mask key) of ``length`` bytes."""
    if length < 126:
        header = bytes([0x82, 0x80 | length])
    elif length < 65536:
        header = bytes([0x82, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x82, 0x80 | 127]) + length.to_bytes(8, "big")
    return header + b"\0\0\0\0" + bytes(length)


@attrs.define(eq=False)
class Reading:
    """A handler that accepts, then reads only when told (a reader busy elsewhere)."""

    connections: list[WebSocketConnection] = attrs.field(factory=list)
    received: list[list[str | bytes]] = attrs.field(factory=list)
    go: trio.Event = attrs.field(factory=trio.Event)
    _more: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, upgrade: Upgrade) -> None:
        ws = await upgrade.accept()
        frames: list[str | bytes] = []
        self.connections.append(ws)
        self.received.append(frames)
        await self.go.wait()
        while True:
            try:
                frames.extend(await receive_frames(ws))
            except ConnectionClosed:
                return
            self._more.set()

    async def wait_for(self, counts: list[int], timeout: float = 20.0) -> None:
        """Until the first sockets have received these many messages each."""
        with trio.fail_after(timeout):
            while [len(frames) for frames in self.received[: len(counts)]] != counts:
                self._more = trio.Event()
                await self._more.wait()


@asynccontextmanager
async def worker_port_sockets(
    engine: Engine, handler: Any, count: int
) -> AsyncIterator[list[Peer]]:
    """``count`` upgraded sockets served as the worker port serves them (its options)."""
    peers = []
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(
                partial(
                    serve_socket,
                    server_stream,
                    handler,
                    admission=engine.sockets,
                    options=connection_options(engine),
                    port_name="worker port",
                )
            )
            peer = Peer(client_stream)
            await upgraded(peer)
            peers.append(peer)
        yield peers
        nursery.cancel_scope.cancel()


async def test_a_busy_reader_has_a_bounded_number_of_bytes_queued_ahead_of_it() -> None:
    """trio-websocket's reader queued up to 64 whole messages (``message_queue_size``)
    ahead of ours, each up to ``max_message_size``: bytes, not messages, must bound it."""
    engine = Engine(make_config(max_message_size=MiB))
    reading = Reading()
    message = 256 * 1024
    async with worker_port_sockets(engine, reading, 1) as [peer]:
        await peer.stream.send_all(binary_message(message) * 40)  # 10 MiB, sent at once
        await trio.testing.wait_all_tasks_blocked()
        [ws] = reading.connections
        held = held_by_library(ws)
        # At most one message queued past the read-ahead, and one being assembled.
        assert held <= 2 * MiB, f"{held / MiB:.1f} MiB held ahead of a busy reader"
        reading.go.set()
        await reading.wait_for([40])
        assert all(frame == bytes(message) for frame in reading.received[0])


def fragments(length: int, pieces: int) -> list[bytes]:
    """One binary message of ``length`` zero bytes as ``pieces`` masked frames."""
    size = length // pieces
    frames = []
    for index in range(pieces):
        opcode = 0x2 if index == 0 else 0x0
        final = 0x80 if index == pieces - 1 else 0
        header = bytes([final | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
        frames.append(header + b"\0\0\0\0" + bytes(size))
    return frames


def closes(peer: Peer) -> list[int]:
    """Close codes the peer has read (without waiting)."""
    return [event.code for event in peer.events if isinstance(event, CloseConnection)]


async def test_all_sockets_together_hold_at_most_max_inbound_bytes_and_none_is_dropped() -> None:
    engine = Engine(make_config(max_message_size=MiB, max_inbound_bytes=4 * MiB))
    reading = Reading()
    sockets, messages = 8, 8
    async with worker_port_sockets(engine, reading, sockets) as peers:
        for peer in peers:
            await peer.stream.send_all(binary_message(MiB) * messages)
        await trio.testing.wait_all_tasks_blocked()
        held = sum(held_by_library(ws) for ws in reading.connections)
        # The budget, the oldest message past it, and each socket's free read-ahead.
        bound = 4 * MiB + MiB + sockets * 64 * 1024
        assert held <= bound, f"{held / MiB:.1f} MiB held by {sockets} sockets"
        assert engine.inbound.used <= 5 * MiB
        # Backpressure, not refusal: every socket is still open, and loses nothing.
        reading.go.set()
        await reading.wait_for([messages] * sockets)
        assert all(frame == bytes(MiB) for frames in reading.received for frame in frames)
        assert not any(closes(peer) for peer in peers)
        assert engine.inbound.used == 0


async def test_a_socket_that_waits_for_room_past_the_timeout_is_closed_with_1013(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(
        make_config(max_message_size=MiB, max_inbound_bytes=MiB, inbound_wait_timeout_ms=1000)
    )
    reading = Reading()
    async with worker_port_sockets(engine, reading, 3) as peers:
        for peer in peers:
            await peer.stream.send_all(binary_message(MiB))
            await trio.testing.wait_all_tasks_blocked()
        # The first message fills the budget, the second goes past it (the oldest
        # receiver), the third waits: its socket is not read.
        assert not any(closes(peer) for peer in peers)
        with trio.fail_after(10):
            refused = await peers[2].read_until(CloseConnection)
        assert refused.code == 1013
        await trio.sleep(5)  # the two others wait for their (busy) reader only
        assert [closes(peer) for peer in peers[:2]] == [[], []]
        assert engine.inbound.statistics().timed_out == 1
        reading.go.set()
        await reading.wait_for([1, 1])
        assert engine.inbound.used == 0
    assert "closed (1013)" in caplog.text


async def test_large_messages_received_at_once_all_complete_the_oldest_first() -> None:
    """Each would hold part of the budget and wait for the others forever, were
    the oldest receiver not let past the limit (up to one message)."""
    engine = Engine(
        make_config(max_message_size=MiB, max_inbound_bytes=MiB, inbound_wait_timeout_ms=600_000)
    )
    reading = Reading()
    reading.go.set()
    async with worker_port_sockets(engine, reading, 3) as peers:
        pieces = [fragments(MiB, 16) for _ in peers]
        for index in range(16):  # interleaved, one fragment of each in turn
            for peer, frames in zip(peers, pieces, strict=True):
                await peer.stream.send_all(frames[index])
        await reading.wait_for([1, 1, 1], timeout=10)
        assert all(frames == [bytes(MiB)] for frames in reading.received)
        assert engine.inbound.peak <= 2 * MiB
