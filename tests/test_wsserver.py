"""iii.wsserver: the supervised WebSocket server, and the trio-websocket surface it needs.

Sockets here are in-memory stream pairs (no port) served by
:func:`~iii.wsserver.serve_socket`; the peer is a raw wsproto client.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

import pytest
import trio
import trio.testing
import wsproto
from trio_websocket import WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, RejectConnection, Request

from iii.admission import Admission, ConnectionLimits
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
