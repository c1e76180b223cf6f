"""Serving a WebSocket port: our accept loop, and one supervised task per socket.

Both WebSocket ports, the worker port (:mod:`iii.listener`) and the stream
port (:mod:`iii.modules.stream.server`), are served here rather than by
trio-websocket's ``serve_websocket``, for three reasons (issue 10):

* **Containment.**  trio-websocket runs each connection's reader task in a
  nursery inside the handler nursery it is given (the engine's), so an
  exception in that reader crashed the engine.  Here each accepted socket
  runs :func:`serve_socket`: the library's reader task and our handler run in
  a per-connection nursery; any ``Exception`` from either is logged once
  with the connection's id and peer (:mod:`iii.containment`), the socket is
  aborted, and nothing reaches the listener's nursery.  ``trio.Cancelled``
  always propagates.
* **trio-websocket #184**, fixed at its cause by :class:`GuardedConnection`:
  the library answered a Ping with a Pong after our Close (and an oversized
  message with a second Close), which wsproto refuses with
  ``LocalProtocolError``.  It needs trio-websocket's private surface
  (``PRIVATE_SURFACE``), so the dependency is pinned to ``>=0.12.2,<0.13``
  and ``tests/test_wsserver.py`` fails if that surface changes.
* **Accounting on accept** (:mod:`iii.admission`): a socket takes a slot
  before its handshake, so sockets that never finish it count too.  One
  past its address's share is refused at once (HTTP 503 written without
  reading, then closed); the handler answers 503 itself when the upgraded
  connections are full (:meth:`Upgrade.accept`).  When the handler returns,
  the socket is closed at once: a refused upgrade frees its slot right away.

* **Inbound bytes** (:mod:`iii.inbound`), counted by :class:`GuardedConnection`
  as they arrive: the library's reader queued up to ``message_queue_size``
  whole messages ahead of ours, each up to ``max_message_size`` (64 x 64 MiB
  per worker socket).  Here a complete message is queued only while the bytes
  queued ahead of our reader are under ``read_ahead_bytes`` (or none are), so
  a socket holds at most ``max(read_ahead_bytes, one message)`` queued plus
  the message being received; and every byte past a socket's first
  ``read_ahead_bytes`` is taken from the engine-wide ``inbound`` budget
  before more is read.  A socket that finds no room is not read
  (backpressure); one that waits past ``inbound_wait_timeout`` is closed
  with 1013 (try again later).

A handler gets an :class:`Upgrade` (the request, the peer, and ``accept`` /
``reject``), and owns the connection until it returns.

Lifetime: :func:`serve_websockets` runs until cancelled; each socket runs in
``handler_nursery`` (the engine's connection nursery, or the stream
server's) and ends with its handler, or when its owner cancels it.
"""

from __future__ import annotations

import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from sys import getsizeof
from typing import Any

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from iii.admission import Admission, Slot, peer_of
from iii.containment import report_failure
from iii.inbound import InboundAccount, InboundBudget
from iii.log import RateLimitedLog

__all__ = [
    "GuardedConnection",
    "ConnectionOptions",
    "Upgrade",
    "TooManyConnectionsError",
    "WebSocketPort",
    "serve_websockets",
    "serve_socket",
    "PRIVATE_SURFACE",
]

log = logging.getLogger(__name__)

# trio-websocket's private attributes we rely on, here and in iii.wsio.
PRIVATE_SURFACE = (
    "_reader_task",
    "_get_request",
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

# Written to a socket refused on accept; its request is never read.
REFUSED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nConnection: close\r\n\r\nToo many connections\n"
)
REFUSE_TIMEOUT = 0.5

_connection_ids = itertools.count(1)


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
        if self._message_parts or not event.message_finished or (
            queued and queued + cost > self._read_ahead
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


@attrs.frozen(kw_only=True)
class ConnectionOptions:
    """How each socket of a port is served."""

    max_message_size: int = 1024 * 1024
    message_queue_size: int = 1
    receive_buffer_size: int = 4096
    handshake_timeout: float = 10.0  # accept -> upgrade request read
    close_timeout: float = 2.0  # our Close -> the peer's answer
    # Bytes of complete messages queued ahead of our reader (one message in
    # any case); also what a socket holds without drawing on ``inbound``.
    read_ahead_bytes: int = 4096
    # The engine-wide budget of inbound bytes (None: bounded per socket only),
    # and how long a socket may wait for room in it before it is closed.
    inbound: InboundBudget | None = attrs.field(default=None, eq=False)
    inbound_wait_timeout: float = 15.0


class TooManyConnectionsError(Exception):
    """``max_connections`` upgraded already: the request was answered 503."""


@attrs.define(eq=False)
class Upgrade:
    """A WebSocket upgrade request on one of our ports, not answered yet."""

    request: WebSocketRequest
    connection_id: int
    peer: str  # "address:port", for the log
    address: str
    _slot: Slot

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.request.headers

    async def accept(self, *, credentialed: bool = False) -> GuardedConnection:
        """Upgrade; ``credentialed``: the peer proved a credential (see :mod:`iii.admission`).

        Past ``max_connections`` it answers 503 and raises
        :class:`TooManyConnectionsError` (the server logs it).
        """
        if not self._slot.upgrade(credentialed=credentialed):
            await self.request.reject(503, body=b"Too many connections")
            raise TooManyConnectionsError()
        ws = await self.request.accept()
        assert isinstance(ws, GuardedConnection)  # every socket of ours is one
        return ws

    async def reject(
        self,
        status_code: int,
        *,
        body: bytes = b"",
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await self.request.reject(status_code, extra_headers=extra_headers, body=body)


Handler = Callable[[Upgrade], Awaitable[None]]


@attrs.define(eq=False)
class WebSocketPort:
    """A port being served: where it listens and who holds its sockets."""

    port: int
    admission: Admission


@attrs.define(eq=False)
class _Port:
    """What every socket of one port shares."""

    name: str  # "worker port", "stream port": for the log
    handler: Handler
    admission: Admission
    options: ConnectionOptions
    # Port-wide: the refused peers have no connection to keep a limiter in.
    refusals: RateLimitedLog = attrs.field(
        factory=lambda: RateLimitedLog(log, burst=1, interval=10.0)
    )


@attrs.frozen
class _Socket:
    """Who is on the other end of one accepted socket, for the log."""

    port_name: str
    connection_id: int
    peer: str  # "address:port"
    address: str

    @property
    def label(self) -> str:
        return f"{self.port_name} connection {self.connection_id} from {self.peer}"


async def serve_socket(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    admission: Admission,
    options: ConnectionOptions,
    port_name: str,
) -> None:
    """Serve one accepted socket (see the module docstring); returns when it is closed."""
    await _serve_socket(stream, _Port(port_name, handler, admission, options))


async def _serve_socket(stream: trio.abc.Stream, port: _Port) -> None:
    peer, address = peer_of(stream)
    socket = _Socket(port.name, next(_connection_ids), peer, address)
    slot = port.admission.admit(address)
    if slot is None:
        port.refusals.warning(
            "%s: refused a socket from %s on accept: max_connections_per_address (%d) "
            "or max_connections (%d) handshakes reached",
            port.name,
            address,
            port.admission.limits.max_per_address,
            port.admission.limits.max_connections,
        )
        await _refuse(stream)
        return
    # The socket's whole subtree (the library's reader, our handler, and this
    # module's own code) ends here.  Inline, not iii.containment.contained:
    # every coroutine layer above a connection's reader is paid on each of
    # its wake-ups.
    try:
        await _supervise(stream, port, slot, socket)
    except* ConnectionClosed:
        pass  # the peer went away: the normal end of a connection
    except* TooManyConnectionsError:
        port.refusals.warning(
            "%s: refused a connection from %s: max_connections (%d) reached (503)",
            port.name,
            socket.peer,
            port.admission.limits.max_connections,
        )
    except* Exception as group:
        report_failure(socket.label, group)
    finally:
        slot.release()
        # The socket goes now, whatever state it is in: a refused upgrade
        # (401, 404, 503) frees its slot at once, a failed one is aborted.
        await trio.aclose_forcefully(stream)


async def _refuse(stream: trio.abc.Stream) -> None:
    """Answer 503 without reading (plain TCP only: TLS would need a handshake) and close."""
    try:
        if not isinstance(stream, trio.SSLStream):
            with trio.move_on_after(REFUSE_TIMEOUT):
                await stream.send_all(REFUSED_RESPONSE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _supervise(stream: trio.abc.Stream, port: _Port, slot: Slot, socket: _Socket) -> None:
    """The library's reader and our handler in one nursery: either one's
    exception cancels the other and leaves through the nursery."""
    options = port.options
    ws = GuardedConnection(
        stream,
        WSConnection(ConnectionType.SERVER),
        inbound=InboundAccount(
            budget=options.inbound,
            allowance=options.read_ahead_bytes,
            wait_timeout=options.inbound_wait_timeout,
        ),
        read_ahead_bytes=options.read_ahead_bytes,
        label=socket.label,
        refusals=port.refusals,
        message_queue_size=options.message_queue_size,
        max_message_size=options.max_message_size,
        receive_buffer_size=options.receive_buffer_size,
    )
    try:
        async with trio.open_nursery() as connection_nursery:
            connection_nursery.start_soon(ws._reader_task)
            request = await _handshake(ws, options.handshake_timeout)
            if request is None:
                log.debug("%s: no upgrade request", socket.label)
            else:
                upgrade = Upgrade(request, socket.connection_id, socket.peer, socket.address, slot)
                try:
                    await port.handler(upgrade)
                except BaseException:
                    connection_nursery.cancel_scope.cancel()  # no close handshake: aborted
                    raise
                with trio.move_on_after(options.close_timeout):
                    await ws.aclose()
            connection_nursery.cancel_scope.cancel()
    finally:
        ws.close_inbound()  # whatever it still held goes back to the budget


async def _handshake(ws: GuardedConnection, timeout: float) -> WebSocketRequest | None:
    """The upgrade request; None if none came in time or the peer left first."""
    request: WebSocketRequest | None = None
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as handshake_nursery:

            async def take_request() -> None:
                nonlocal request
                request = await ws._get_request()
                handshake_nursery.cancel_scope.cancel()

            async def left() -> None:
                # Set by the reader when the socket ends before any request.
                await ws._close_handshake.wait()
                handshake_nursery.cancel_scope.cancel()

            handshake_nursery.start_soon(take_request)
            handshake_nursery.start_soon(left)
    return request


async def serve_websockets(
    handler: Handler,
    *,
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    admission: Admission,
    options: ConnectionOptions,
    port_name: str,
    handler_nursery: trio.Nursery,
    task_status: trio.TaskStatus[WebSocketPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sockets until cancelled; each is served in ``handler_nursery``."""
    tcp_listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(tcp_listeners[0].socket.getsockname()[1])
    listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(tcp, ssl_context, https_compatible=True) for tcp in tcp_listeners
        ]
    shared = _Port(port_name, handler, admission, options)
    async with trio.open_nursery() as accept_nursery:
        await accept_nursery.start(
            partial(
                trio.serve_listeners,
                partial(_serve_socket, port=shared),
                listeners,
                handler_nursery=handler_nursery,
            )
        )
        task_status.started(WebSocketPort(port=bound, admission=admission))
