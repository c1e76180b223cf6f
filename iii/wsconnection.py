"""trio-websocket's server connection, guarded: issue #184 fixed, and inbound bytes bounded.

:class:`GuardedConnection` is the connection class of every socket our
WebSocket server (:mod:`iii.wsserver`) accepts, on the worker port and the
stream port.  It changes two things of trio-websocket's connection:

* **trio-websocket #184**: the library answered a Ping with a Pong after our
  Close (and an oversized message with a second Close), which wsproto
  refuses with ``LocalProtocolError`` out of the reader task (it crashed the
  engine, issue 10 row 1);
* **inbound bytes** (:mod:`iii.inbound`): the library's reader queued up to
  ``message_queue_size`` whole messages ahead of ours, each up to
  ``max_message_size`` (64 x 64 MiB per worker socket); here they are
  counted in bytes as they arrive, and bounded per socket and engine-wide.

Both need trio-websocket's private surface (``PRIVATE_SURFACE``), so the
dependency is pinned to ``>=0.12.2,<0.13`` and ``tests/test_wsserver.py``
fails if that surface changes.

Lifetime: a connection lives as long as its socket's task in
:mod:`iii.wsserver`, which calls :meth:`GuardedConnection.close_inbound`
when the socket ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from sys import getsizeof
from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from iii.inbound import InboundAccount
from iii.log import RateLimitedLog

__all__ = ["GuardedConnection", "PRIVATE_SURFACE", "open_client_connection"]

log = logging.getLogger(__name__)

# trio-websocket's private attributes we rely on, here and in iii.wsio.
PRIVATE_SURFACE = (
    "_reader_task",
    "_get_request",
    "_open_handshake",
    "_close_handshake",
    "_handle_ping_event",
    "_send",
    "_wsproto",
    "_stream",
    "_stream_lock",
    "_close_reason",
    "_recv_channel",
    "_send_channel",
    "_abort_web_socket",
    "_aclose",
    "_handle_message_event",
    "_message_parts",
    "_message_size",
    "_max_message_size",
    "_reader_running",
)


class GuardedConnection(WebSocketConnection):
    """trio-websocket's server connection with issue #184 fixed, and inbound bytes bounded.

    After a Close has been sent (ours) or received (theirs), wsproto refuses
    to send anything but the Close reply.  The library still tried: a Pong
    for each Ping that arrives while our Close waits for its answer, and a
    1009 Close for an oversized message in the same state.  Each raised
    ``LocalProtocolError`` out of the reader task.  Here a Pong is sent only
    while the connection is OPEN (what python-trio/trio-websocket PR #198
    does), and any control frame wsproto would refuse is not sent: the
    connection is closing, there is nothing left to say.  A message in that
    state raises ``ConnectionClosed``, as ``send_message`` does.

    Inbound bytes (see the module docstring): the library's
    ``_handle_message_event`` is replaced by one that counts each part of a
    message in ``inbound`` (an :class:`~iii.inbound.InboundAccount`) before
    it keeps it, and holds a complete message (still in parts) while the
    bytes queued ahead of our reader are at ``read_ahead_bytes``.  Messages
    leave the count when our reader takes them (:meth:`get_message`,
    :meth:`get_ready_messages`); the rest when the socket ends
    (:meth:`close_inbound`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws_connection: WSConnection,
        *,
        inbound: InboundAccount | None = None,
        read_ahead_bytes: int = 0,
        label: str = "connection",
        refusals: RateLimitedLog | None = None,
        **options: Any,
    ) -> None:
        super().__init__(stream, ws_connection, **options)
        self._inbound = inbound if inbound is not None else InboundAccount()
        self._read_ahead = read_ahead_bytes
        self._label = label
        self._refusals = refusals or RateLimitedLog(log, burst=1, interval=10.0)
        self._queued = 0  # bytes of complete messages not taken by our reader yet
        self._parts_cost = 0  # bytes of the parts of the message being received
        self._discarding = False  # set when we stop reading: what comes is dropped
        self._queue_lot = trio.lowlevel.ParkingLot()  # the reader task, at read_ahead_bytes
        self._queue_full = False  # it is parked there
        self._wait_scope: trio.CancelScope | None = None
        # Offered each complete message first, in this reader task, when none
        # waits in the queue: True if it took it (then it is not queued).  For
        # our side of an engine link (iii.link.connection): one hand-off less.
        self.on_message: Callable[[str | bytes], bool] | None = None

    # -- inbound bytes ----------------------------------------------------------------

    def limit_read_ahead(self, read_ahead_bytes: int) -> None:
        """Queue complete messages ahead of our reader up to this many bytes (0: one)."""
        self._read_ahead = read_ahead_bytes

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        if self._discarding:
            return  # we stopped reading: the rest of what was read goes
        data = event.data
        if isinstance(data, bytearray):
            data = bytes(data)  # (wsproto gives bytes; its types allow a bytearray)
        self._message_size += len(data)
        if self._message_size > self._max_message_size:
            await self._stop_reading(
                1009, f"Exceeded maximum message size: {self._max_message_size} bytes"
            )
            return
        cost = getsizeof(data)
        inbound = self._inbound
        held = inbound.held + cost
        if held <= inbound.allowance + inbound.charged:
            inbound.held = held  # (InboundAccount.add_nowait's first case, inline)
        elif not inbound.add_nowait(cost) and not await self._wait_for_room(cost):
            return
        queued = self._queued
        if (
            self._message_parts
            or not event.message_finished
            or (queued and queued + cost > self._read_ahead)
        ):
            self._parts_cost += cost
            self._message_parts.append(data)
            if event.message_finished:
                await self._queue_message(type(event) is BytesMessage)
            return
        # The common case, inline (it is paid on every message): a message in one
        # part, with room ahead of our reader.
        if inbound.receiving:
            inbound.message_done()
        self._message_size = 0
        on_message = self.on_message
        if on_message is not None and not queued and on_message(data):
            # Taken here, with nothing ahead of it in the queue: not queued.
            if inbound.charged:
                inbound.remove(cost)
            else:
                inbound.held -= cost
            return
        self._queued = queued + cost
        try:
            await self._send_channel.send(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._queued -= cost
            inbound.remove(cost)

    async def _wait_for_room(self, cost: int) -> bool:
        """Wait, not reading, for room in the engine-wide budget; False: stopped reading."""
        try:
            with trio.CancelScope() as self._wait_scope:  # cancelled by our own close
                if await self._inbound.add(cost):
                    return True
        finally:
            self._wait_scope = None
        if not self._discarding:
            self._refusals.warning(
                "%s: closed (1013): no room for its messages within %gs (max_inbound_bytes)",
                self._label,
                self._inbound.wait_timeout,
            )
            await self._stop_reading(1013, "try again later: the engine is receiving too much")
        return False

    async def _queue_message(self, binary: bool) -> None:
        """Hand a complete message (in ``_message_parts``) to our reader's queue, within
        ``read_ahead_bytes``."""
        inbound = self._inbound
        inbound.message_done()
        cost = self._parts_cost
        # The parts wait where they are (counted) while the queue is at its bound.
        while self._queued and self._queued + cost > self._read_ahead and not self._discarding:
            self._queue_full = True
            try:
                await self._queue_lot.park()
            finally:
                self._queue_full = False
        if self._discarding:
            return  # dropped with its parts by _discard
        parts = self._message_parts
        self._message_parts = []
        self._message_size = 0
        self._parts_cost = 0
        message: str | bytes
        if len(parts) == 1:
            message, size = parts[0], cost
        else:
            message = b"".join(parts) if binary else "".join(parts)  # type: ignore[arg-type]
            size = getsizeof(message)
            if size < cost:
                inbound.remove(cost - size)
            elif size > cost and not inbound.add_nowait(size - cost):
                # (Text whose last parts are wider than its first.)
                inbound.remove(cost)
                if not await self._wait_for_room(size):
                    return
        self._queued += size
        try:
            await self._send_channel.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._queued -= size
            inbound.remove(size)

    async def _stop_reading(self, code: int, reason: str) -> None:
        """Drop what is held, end our reader's wait, and Close with ``code``."""
        self._discard()
        self._close_reason = CloseReason(code, reason)
        # Our reader first: it ends at once, even if the Close cannot be written.
        await self._recv_channel.aclose()
        self._reader_running = False
        await self._send(CloseConnection(code=code, reason=reason))

    def _discard(self) -> None:
        self._discarding = True
        self._inbound.remove(self._parts_cost)
        self._inbound.message_done()
        self._message_parts = []
        self._message_size = 0
        self._parts_cost = 0
        self._queue_lot.unpark_all()  # (a parked reader task sees _discarding)
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def _taken(self, size: int) -> None:
        # (Inline in get_message, which is paid on every message or batch.)
        self._queued -= size
        inbound = self._inbound
        if inbound.charged:
            inbound.remove(size)
        else:
            inbound.held -= size  # within the allowance: nothing to give back
        if self._queue_full:
            self._queue_lot.unpark_all()

    async def get_message(self) -> str | bytes:
        """The next message (as trio-websocket's), counted out of the inbound bytes."""
        try:
            message = await self._recv_channel.receive()
        except (trio.ClosedResourceError, trio.EndOfChannel):
            raise ConnectionClosed(self._close_reason) from None
        size = getsizeof(message)
        self._queued -= size
        inbound = self._inbound
        if inbound.charged:
            inbound.remove(size)
        else:
            inbound.held -= size
        if self._queue_full:
            self._queue_lot.unpark_all()
        return message

    def get_ready_messages(self, into: list[str | bytes]) -> None:
        """Append every message received already to ``into``, without waiting."""
        receive_nowait = self._recv_channel.receive_nowait
        taken = 0
        try:
            while True:
                message = receive_nowait()
                into.append(message)
                taken += getsizeof(message)
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            pass
        if taken:
            self._taken(taken)

    async def _aclose(self, code: int, reason: str | None) -> None:
        # Our side closes: what was not taken is dropped (as the library drops
        # its queue), and a wait for room ends.
        self._discard()
        await super()._aclose(code, reason)

    def close_inbound(self) -> None:
        """The socket is gone: every byte it held goes back (idempotent)."""
        self._discard()
        self._queued = 0
        self._inbound.close()

    # -- trio-websocket #184 ------------------------------------------------------------

    async def _handle_ping_event(self, event: Ping) -> None:

        if self._wsproto.state is ConnectionState.OPEN:
            await self._send(event.response())

    def _send(self, event: Event) -> Coroutine[Any, Any, None]:
        # A plain method returning the library's coroutine (or a no-op one):
        # an ``async def`` here would add a coroutine layer to every send.
        # (Exact types, not isinstance: wsproto's events are ABCs, slow to check.)
        kind = type(event)
        if kind in _OPEN_ONLY:
            if self._wsproto.state is not ConnectionState.OPEN:
                if kind is TextMessage or kind is BytesMessage:
                    raise ConnectionClosed(self._close_reason or CloseReason(1006, "closing"))
                return _nothing()
        elif kind is CloseConnection and self._wsproto.state not in _MAY_CLOSE:
            return _nothing()  # ours is out already
        return super()._send(event)


async def _nothing() -> None:
    pass


_OPEN_ONLY = frozenset({TextMessage, BytesMessage, Ping, Pong})
_MAY_CLOSE = frozenset({ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING})


async def open_client_connection(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    path: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    max_message_size: int = 64 * 1024 * 1024,
    reader_scope: trio.CancelScope | None = None,
) -> GuardedConnection:
    """The client end of a WebSocket, as ``trio_websocket.wrap_client_stream`` makes it.

    On a :class:`GuardedConnection`: trio-websocket's own client has issue
    #184 too (its reader answers a Ping after the Close went out and raises
    ``LocalProtocolError``), so a peer that pings while we close could fail
    the task holding the client.  The reader task runs in ``nursery``.
    Inbound bytes are left to the library's one-message queue.  With
    ``reader_scope`` the reader runs inside that scope (a shielded one keeps
    it reading through a cancellation until its owner cancels the scope).
    """
    connection = GuardedConnection(
        stream,
        WSConnection(ConnectionType.CLIENT),
        host=host,
        path=path,
        client_extra_headers=extra_headers,
        max_message_size=max_message_size,
        read_ahead_bytes=max_message_size,
        label="client",
    )
    if reader_scope is None:
        nursery.start_soon(connection._reader_task)
    else:
        nursery.start_soon(_read_within, reader_scope, connection)
    await connection._open_handshake.wait()
    return connection


async def _read_within(scope: trio.CancelScope, connection: GuardedConnection) -> None:
    with scope:
        await connection._reader_task()
