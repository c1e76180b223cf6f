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
* **trio-websocket #184**, fixed at its cause by
  :class:`~iii.wsconnection.GuardedConnection`: the library answered a Ping
  with a Pong after our Close (and an oversized message with a second
  Close), which wsproto refuses with ``LocalProtocolError``.
* **Accounting on accept** (:mod:`iii.admission`): a socket takes a slot
  before its handshake, so sockets that never finish it count too.  One
  past its address's share is refused at once (HTTP 503 written without
  reading, then closed); the handler answers 503 itself when the upgraded
  connections are full (:meth:`Upgrade.accept`).  When the handler returns,
  the socket is closed at once: a refused upgrade frees its slot right away.
* **Inbound bytes** (:mod:`iii.inbound`), counted by the same
  :class:`~iii.wsconnection.GuardedConnection` as they arrive: a socket
  holds at most ``max(read_ahead_bytes, one message)`` queued ahead of our
  reader plus the message being received, and past its first
  ``read_ahead_bytes`` it draws on the engine-wide ``inbound`` budget
  (:class:`ConnectionOptions`).  A socket that finds no room is not read
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
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest
from wsproto import ConnectionType, WSConnection

from iii.admission import Admission, Slot, peer_of
from iii.binding import NO_KEYS, open_tcp_listeners
from iii.containment import report_failure
from iii.inbound import InboundAccount, InboundBudget
from iii.log import RateLimitedLog
from iii.wsconnection import PRIVATE_SURFACE, GuardedConnection

__all__ = [
    "GuardedConnection",  # (from iii.wsconnection, with PRIVATE_SURFACE)
    "ConnectionOptions",
    "Upgrade",
    "TooManyConnectionsError",
    "WebSocketPort",
    "serve_websockets",
    "serve_socket",
    "PRIVATE_SURFACE",
]

log = logging.getLogger(__name__)

# Written to a socket refused on accept; its request is never read.
REFUSED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nConnection: close\r\n\r\nToo many connections\n"
)
REFUSE_TIMEOUT = 0.5

_connection_ids = itertools.count(1)


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
    keys: tuple[str, bool] = NO_KEYS,
    task_status: trio.TaskStatus[WebSocketPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sockets until cancelled; each is served in ``handler_nursery``.

    ``keys``: the config keys that set ``host`` and ``port``, named by the
    :class:`~iii.errors.BindError` a failed bind raises."""
    tcp_listeners = await open_tcp_listeners(port_name, host, port, keys)
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
