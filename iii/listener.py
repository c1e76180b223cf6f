"""The engine's WebSocket listener (default port 49134) and its three routes.

* ``/``                  a worker connection (:class:`~iii.worker_conn.WorkerConnection`)
* ``/otel``              a telemetry-only socket: binary ``OTLP``/``MTRC``/``LOGS``
                         frames go to the telemetry sink; nothing is registered
* ``/ws/channels/{id}``  one side of a streaming channel (:mod:`iii.channel_conn`)

Anything else is refused with HTTP 404 before the upgrade.  Sockets are
accepted and supervised by :mod:`iii.wsserver`: each runs in the engine's
connection nursery, so the engine can cancel all of them at shutdown, and a
failure in one ends that one only.

Checks (:mod:`iii.security`, :mod:`iii.admission`): on accept, at most
``max_connections_per_address`` sockets per peer address that hold no
credential (else refused at once); with ``auth.tokens`` set, ``/`` and
``/otel`` need a valid ``Authorization: Bearer`` header (else 401, logged
with the peer and the reason, never the token); past ``max_connections``
upgraded sockets a new one gets 503.  With ``tls.cert`` / ``tls.key`` the
port speaks TLS (``wss://``).  Messages over ``max_message_size`` close the
socket with 1009.  Inbound bytes (:mod:`iii.wsserver`): a socket queues at
most ``READ_AHEAD_BYTES`` (or one message) ahead of its reader, and draws on
the engine's ``max_inbound_bytes`` beyond that.

Lifetime: :func:`serve_listener` runs until ``listener_scope`` is cancelled
(shutdown step 1); the sockets it accepted live on in the connection nursery
until the engine closes them.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.channel_conn import serve_channel_side
from iii.log import RateLimitedLog
from iii.protocol import TELEMETRY_PREFIXES
from iii.security import AuthRefusal, server_ssl_context
from iii.worker_conn import WorkerConnection
from iii.wsserver import ConnectionOptions, Upgrade, WebSocketPort, serve_websockets

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["serve_listener", "handle_upgrade", "connection_options"]

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "/ws/channels/"
# Bytes of whole messages a socket may queue ahead of our reader, and hold
# without drawing on the engine's max_inbound_bytes (iii.wsserver).
READ_AHEAD_BYTES = 64 * 1024


async def handle_upgrade(engine: Engine, upgrade: Upgrade) -> None:
    """Route one upgrade request by path."""
    target = urlsplit(upgrade.path)
    path = target.path or "/"
    is_otel = path.rstrip("/") == "/otel"
    # With tokens on, a socket past this point has proved a credential (a token,
    # or a channel's key): it no longer counts against its address's share.
    credentialed = engine.authenticator.enabled
    if path == "/" or is_otel:
        grant = engine.authenticator.authenticate(upgrade.headers)
        if isinstance(grant, AuthRefusal):
            shown = "/otel" if is_otel else "/"  # (the path as sent may have more slashes)
            log.warning(
                "refused %s upgrade from %s: %s (401)", shown, upgrade.address, grant.reason
            )
            await upgrade.reject(
                401,
                extra_headers=[(b"WWW-Authenticate", b'Bearer realm="iii"')],
                body=b"Unauthorized",
            )
            return
    if path == "/":
        assert not isinstance(grant, AuthRefusal)  # refused above
        ws = await upgrade.accept(credentialed=credentialed)
        await WorkerConnection(engine, ws, ip_address=upgrade.address, grant=grant).run()
    elif is_otel:
        ws = await upgrade.accept(credentialed=credentialed)
        await _serve_telemetry(engine, ws)
    elif path.startswith(CHANNEL_PREFIX):
        query = parse_qs(target.query)
        await serve_channel_side(
            engine,
            upgrade,
            channel_id=path[len(CHANNEL_PREFIX) :].strip("/"),
            access_key=(query.get("key") or [""])[0],
            direction=(query.get("dir") or [""])[0],
            credentialed=credentialed,
        )
    else:
        await upgrade.reject(404, body=b"Not Found")


async def _serve_telemetry(engine: Engine, ws: WebSocketConnection) -> None:
    bad_frame_log = RateLimitedLog(log)  # this socket's own
    while True:
        try:
            frame = await ws.get_message()
        except ConnectionClosed:
            bad_frame_log.report_held("a telemetry socket closed")
            return
        if isinstance(frame, bytes) and frame[:4] in TELEMETRY_PREFIXES:
            engine.telemetry.ingest(frame, None, bad_frame_log)


def connection_options(engine: Engine) -> ConnectionOptions:
    config = engine.config
    return ConnectionOptions(
        max_message_size=config.max_message_size,
        # Let the library's reader run ahead of ours by a few messages,
        # instead of a task switch per message: up to 64 of them and
        # READ_AHEAD_BYTES (one message, whatever its size, in any case).
        message_queue_size=64,
        read_ahead_bytes=READ_AHEAD_BYTES,
        receive_buffer_size=65536,
        handshake_timeout=config.handshake_timeout,
        close_timeout=2.0,
        inbound=engine.inbound,
        inbound_wait_timeout=config.inbound_wait_timeout,
    )


async def serve_listener(
    engine: Engine,
    listener_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[WebSocketPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the worker port until ``listener_scope`` is cancelled.

    Accepted sockets run in the engine's connection nursery, so closing the
    listener stops intake without touching live connections.
    """
    config = engine.config
    assert engine.connection_nursery is not None
    with listener_scope:
        await serve_websockets(
            partial(handle_upgrade, engine),
            host=config.host,
            port=config.port,
            ssl_context=server_ssl_context(config.tls),
            admission=engine.sockets,
            options=connection_options(engine),
            port_name="worker port",
            handler_nursery=engine.connection_nursery,
            keys=config.listen_keys(),
            task_status=task_status,
        )
