"""The engine's WebSocket listener (default port 49134) and its three routes.

* ``/``                  a worker connection (:class:`~iii.worker_conn.WorkerConnection`)
* ``/otel``              a telemetry-only socket: binary ``OTLP``/``MTRC``/``LOGS``
                         frames go to the telemetry sink; nothing is registered
* ``/ws/channels/{id}``  one side of a streaming channel (:mod:`iii.channel_conn`)

Anything else is refused with HTTP 404 before the upgrade.  Each accepted
socket's handler runs in the engine's connection nursery (``handler_nursery``),
so the engine can cancel all of them at shutdown.

Checks before the upgrade (:mod:`iii.security`): with ``auth.tokens`` set,
``/`` and ``/otel`` need a valid ``Authorization: Bearer`` header (else 401,
logged with the peer and the reason, never the token); past
``max_connections`` open sockets a new one gets 503.  With ``tls.cert`` /
``tls.key`` the port speaks TLS (``wss://``).  Messages over
``max_message_size`` close the socket with 1009 (trio-websocket).

Lifetime: :func:`serve_listener` runs until ``listener_scope`` is cancelled
(shutdown step 1); the sockets it accepted live on in the connection nursery
until the engine closes them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

from iii.channel_conn import serve_channel_side
from iii.log import RateLimitedLog
from iii.protocol import TELEMETRY_PREFIXES
from iii.security import AuthRefusal, server_ssl_context
from iii.worker_conn import WorkerConnection

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["serve_listener", "handle_request"]

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "/ws/channels/"


async def handle_request(engine: Engine, request: WebSocketRequest, peer: str = "") -> None:
    """Route one upgrade request by path."""
    target = urlsplit(request.path)
    path = target.path or "/"
    is_otel = path.rstrip("/") == "/otel"
    if path == "/" or is_otel:
        grant = engine.authenticator.authenticate(request.headers)
        if isinstance(grant, AuthRefusal):
            log.warning("refused %s upgrade from %s: %s (401)", path, peer or "?", grant.reason)
            await request.reject(
                401, extra_headers=[(b"WWW-Authenticate", b'Bearer realm="iii"')], body=b"Unauthorized"
            )
            return
    if path == "/":
        assert not isinstance(grant, AuthRefusal)  # refused above
        ws = await request.accept()
        await WorkerConnection(engine, ws, ip_address=peer, grant=grant).run()
    elif is_otel:
        ws = await request.accept()
        await _serve_telemetry(engine, ws)
    elif path.startswith(CHANNEL_PREFIX):
        query = parse_qs(target.query)
        await serve_channel_side(
            engine,
            request,
            channel_id=path[len(CHANNEL_PREFIX) :].strip("/"),
            access_key=(query.get("key") or [""])[0],
            direction=(query.get("dir") or [""])[0],
        )
    else:
        await request.reject(404, body=b"Not Found")


async def _serve_telemetry(engine: Engine, ws: object) -> None:
    bad_frame_log = RateLimitedLog(log)  # this socket's own
    while True:
        try:
            frame = await ws.get_message()  # type: ignore[attr-defined]
        except ConnectionClosed:
            bad_frame_log.report_held("a telemetry socket closed")
            return
        if isinstance(frame, bytes) and frame[:4] in TELEMETRY_PREFIXES:
            engine.telemetry.ingest(frame, None, bad_frame_log)


def _peer_of(request: WebSocketRequest) -> str:
    remote = request.remote
    return str(getattr(remote, "address", remote))


async def serve_listener(
    engine: Engine,
    listener_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the worker port until ``listener_scope`` is cancelled.

    Accepted sockets run in the engine's connection nursery, so closing the
    listener stops intake without touching live connections.
    """
    config = engine.config
    ssl_context = server_ssl_context(config.tls)
    # Listener-wide: the refused peers have no connection to keep a limiter in.
    refusals = RateLimitedLog(log, burst=1, interval=10.0)

    async def handler(request: WebSocketRequest) -> None:
        peer = _peer_of(request)
        if engine.open_sockets >= config.max_connections:
            refusals.warning(
                "refused a connection from %s: max_connections (%d) reached (503)", peer, config.max_connections
            )
            await request.reject(503, body=b"Too many connections")
            return
        engine.open_sockets += 1
        try:
            await handle_request(engine, request, peer)
        except ConnectionClosed:
            pass
        except Exception:
            # One connection's failure is logged here and never reaches the
            # connection nursery (the style's error policy).
            log.exception("connection handler failed")
        finally:
            engine.open_sockets -= 1

    with listener_scope:
        await serve_websocket(
            handler,
            config.host,
            config.port,
            ssl_context,
            handler_nursery=engine.connection_nursery,
            max_message_size=config.max_message_size,
            # Let the library's reader run ahead of ours by a few messages,
            # instead of a task switch per message.
            message_queue_size=64,
            receive_buffer_size=65536,
            connect_timeout=config.handshake_timeout,
            disconnect_timeout=2.0,
            task_status=task_status,
        )
