"""The engine's WebSocket listener (default port 49134) and its three routes.

* ``/``                  a worker connection (:class:`~iii.worker_conn.WorkerConnection`)
* ``/otel``              a telemetry-only socket: binary ``OTLP``/``MTRC``/``LOGS``
                         frames go to the telemetry sink; nothing is registered
* ``/ws/channels/{id}``  one side of a streaming channel (:mod:`iii.channel_conn`)

Anything else is refused with HTTP 404 before the upgrade.  Each accepted
socket's handler runs in the engine's connection nursery (``handler_nursery``),
so the engine can cancel all of them at shutdown.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

from iii.channel_conn import serve_channel_side
from iii.protocol import TELEMETRY_PREFIXES
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
    if path == "/":
        ws = await request.accept()
        await WorkerConnection(engine, ws, ip_address=peer).run()
    elif path.rstrip("/") == "/otel":
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
    while True:
        try:
            frame = await ws.get_message()  # type: ignore[attr-defined]
        except ConnectionClosed:
            return
        if isinstance(frame, bytes) and frame[:4] in TELEMETRY_PREFIXES:
            engine.telemetry.ingest(frame, None)


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

    async def handler(request: WebSocketRequest) -> None:
        try:
            await handle_request(engine, request, _peer_of(request))
        except ConnectionClosed:
            pass
        except Exception:
            # One connection's failure is logged here and never reaches the
            # connection nursery (the style's error policy).
            log.exception("connection handler failed")

    with listener_scope:
        await serve_websocket(
            handler,
            config.host,
            config.port,
            None,
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
