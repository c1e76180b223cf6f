"""An HTTP/1.1 server: the transport half, around the sans-I/O protocol of :mod:`.protocol`.

h11 does all the parsing and framing (it is the sans-IO HTTP/1.1 library of
trio's family; this is the loop h11 is meant to be driven by).  Measured on
this machine before choosing (issue 3): a constant JSON answer at 32
connections gave hypercorn's trio worker 1,237 req/s, its asyncio worker
4,048 req/s, and a bare h11 loop on trio 8,688 req/s.

This file owns the sockets: listeners (TCP, or TLS), admission, the
lingering close, and the graceful drain.  Each accepted stream becomes the
``receive`` and ``send`` callables of an :class:`~.protocol.HttpConnection`,
which parses, frames and runs the application (keep-alive, pipelining,
bodies on demand, timeouts, the :class:`~.protocol.Responder`).  TCP_NODELAY
is set by trio on every accepted TCP socket.

A connection closed while the client still sends a body (an answer sent
early: 413, 503) is shut on our side first, and what arrives is dropped for
up to ``LINGER_TIMEOUT``, so the client reads the answer rather than a reset.

Connections are counted from accept (:mod:`iii.admission`): a socket past
``max_connections_per_address`` from its address, or past ``max_connections``
in all, is answered 503 (``Retry-After: 1``) without being read, and closed.

Timeouts (head, keep-alive, each body receive and send) are the
protocol's: see :mod:`.protocol`.

Lifetime: :meth:`HttpServer.serve` runs until cancelled; each connection runs
in the server's own connection nursery.  :meth:`HttpServer.begin_drain` is the
graceful shutdown: stop accepting, close idle connections, let requests in
flight finish (then close their connections).  Whoever owns the server
cancels it once the grace is over.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import attrs
import trio

from iii.admission import Admission, ConnectionLimits, peer_of
from iii.binding import NO_KEYS, open_tcp_listeners
from iii.log import RateLimitedLog
from iii.modules.rest_api.protocol import (
    MAX_CHUNK,
    App,
    BodyTooLargeError,
    ClientGoneError,
    HttpConnection,
    HttpRequest,
    IllegalTransitionError,
    Responder,
    ResponseState,
    ServerState,
    json_error,
    new_error_id,
)

__all__ = [
    "HttpServer",
    # The protocol's names, for the applications of this server:
    "HttpRequest",
    "Responder",
    "ResponseState",
    "IllegalTransitionError",
    "App",
    "ClientGoneError",
    "BodyTooLargeError",
    "json_error",
    "new_error_id",
    "MAX_CHUNK",
]

log = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
# Written to a socket refused on accept (plain TCP); its request is never read.
REFUSED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Retry-After: 1\r\nContent-Length: 21\r\nConnection: close\r\n\r\n"
    b"Too many connections\n"
)
REFUSE_TIMEOUT = 0.5
# Closing with a request body still arriving: how long the rest is read and
# dropped after our side is shut, so the client reads our answer (a 413 or
# 503 sent early) instead of a reset (a "lingering close").
LINGER_TIMEOUT = 2.0


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


async def _linger(stream: trio.abc.Stream) -> None:
    """Shut our side, then read and drop what the client still sends, for at most
    ``LINGER_TIMEOUT``: closing with its body unread would reset the connection,
    and the client could lose the answer.  (Plain TCP only: TLS cannot half-close.)"""
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    with trio.move_on_after(LINGER_TIMEOUT):
        try:
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@attrs.define(eq=False)
class HttpServer:
    """Serves ``app`` on a TCP port; see the module docstring."""

    app: App
    # Who may hold a socket (iii.admission): counted from accept, per peer
    # address and in all; past either a socket gets 503 before it is read.
    admission: Admission = attrs.field(
        factory=lambda: Admission(ConnectionLimits(max_connections=4096, max_per_address=256))
    )
    port: int | None = None
    # The drain flag, idle waits and requests in flight, shared by its connections.
    shared: ServerState = attrs.field(factory=ServerState)
    refused: int = 0  # sockets refused on accept
    _refusals: RateLimitedLog = attrs.field(
        factory=lambda: RateLimitedLog(log, burst=1, interval=10.0)
    )
    _accept_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    @property
    def draining(self) -> bool:
        return self.shared.draining

    @property
    def active_requests(self) -> int:
        return self.shared.active_requests

    async def serve(
        self,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        what: str = "HTTP server",
        keys: tuple[str, bool] = NO_KEYS,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; with ``ssl_context`` the port speaks ``https://``.

        A failed bind raises :class:`~iii.errors.BindError` naming ``what``
        and ``keys`` (the config keys of ``host`` and ``port``)."""
        tcp_listeners = await open_tcp_listeners(what, host or None, port, keys)
        self.port = int(tcp_listeners[0].socket.getsockname()[1])
        listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
        if ssl_context is not None:
            listeners = [
                trio.SSLListener(tcp, ssl_context, https_compatible=True) for tcp in tcp_listeners
            ]
        async with trio.open_nursery() as connection_nursery:
            with self._accept_scope:
                task_status.started(self.port)
                await trio.serve_listeners(
                    self._handle, listeners, handler_nursery=connection_nursery
                )
            for listener in listeners:
                await listener.aclose()
            # Not accepting any more: the nursery waits for open connections.

    def begin_drain(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        self._accept_scope.cancel()
        self.shared.begin_drain()

    @property
    def connections(self) -> int:
        """Sockets open on the port."""
        return self.admission.open

    async def _handle(self, stream: trio.abc.Stream) -> None:
        peer_text, address = peer_of(stream)
        slot = self.admission.admit(address)
        if slot is None:
            self.refused += 1
            self._refusals.warning(
                "REST port: refused a socket from %s on accept (503): "
                "max_connections_per_address (%d) or max_connections (%d) reached",
                address,
                self.admission.limits.max_per_address,
                self.admission.limits.max_connections,
            )
            await _refuse(stream)
            return
        try:
            await self.serve_stream(stream, peer_text)
        finally:
            slot.release()

    async def serve_stream(self, stream: trio.abc.Stream, peer: str = "") -> None:
        """Serve one connection on ``stream`` (any trio stream: a socket, TLS,
        or one end of :func:`trio.testing.memory_stream_pair`), then close it.

        Not counted by admission (:meth:`serve` counts its sockets first)."""

        async def receive() -> bytes | bytearray:
            return await stream.receive_some(RECEIVE_SIZE)

        connection = HttpConnection(self.app, receive, stream.send_all, peer, self.shared)
        try:
            await connection.serve()
        except ClientGoneError as exc:
            log.debug("%s: %s", peer, exc)
        except Exception:
            log.exception("%s: HTTP connection failed", peer)
        finally:
            try:
                if connection.body_unread:
                    await _linger(stream)
            finally:
                with trio.move_on_after(1) as cleanup:
                    cleanup.shield = True
                    await stream.aclose()
