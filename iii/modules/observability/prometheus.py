"""The metrics port: ``GET /metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

A small HTTP/1.1 server on trio + h11 (``prometheus_client``'s own server runs
in a thread, outside trio's supervision).  Each connection is served in the
server's nursery with a deadline; one request per connection (``Connection:
close``).  ``routes`` maps each path to an awaitable giving (status, content
type, body): the observability module gives ``/metrics`` (it refreshes the
modules' I/O-backed numbers, then runs ``prometheus_client.generate_latest``
over its registry) and ``/healthz`` / ``/readyz`` (:mod:`.health`).  Another
path gets 404, a method other than ``GET``/``HEAD`` 405.

The port is optional (upstream has none): it is opened only when the config
asks for it (:class:`~.config.Config`), and then a failed bind stops the
engine with a :class:`~iii.errors.BindError` naming the address and the keys.

Lifetime: :func:`serve_metrics_port` runs in the observability module's
nursery until cancelled; ``task_status.started`` gives the bound port.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import h11
import trio

from iii.binding import NO_KEYS, open_tcp_listeners
from iii.modules.observability.health import Answer

__all__ = ["serve_metrics_port", "CONTENT_TYPE", "Route"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
REQUEST_DEADLINE = 10.0
MAX_REQUEST_BYTES = 16 * 1024
REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 503: b"Service Unavailable"}

Route = Callable[[], Awaitable[Answer]]


async def _respond(
    stream: trio.SocketStream,
    connection: h11.Connection,
    answer: Answer,
    *,
    head: bool = False,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    status, content_type, body = answer
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *(extra or []),
    ]
    reason = REASONS.get(status, b"Bad Request")
    data = connection.send(h11.Response(status_code=status, headers=headers, reason=reason))
    if not head:
        data += connection.send(h11.Data(data=body))
    data += connection.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _serve_one(stream: trio.SocketStream, routes: Mapping[bytes, Route]) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    async with stream:
        with trio.move_on_after(REQUEST_DEADLINE):
            try:
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        connection.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        break
                    return  # closed before a request
                route = routes.get(event.target.split(b"?", 1)[0])
                if route is None:
                    paths = ", ".join(path.decode() for path in routes)
                    answer = (404, TEXT, f"Not Found: try {paths}\n".encode())
                    await _respond(stream, connection, answer)
                elif event.method not in (b"GET", b"HEAD"):
                    answer = (405, TEXT, b"Method Not Allowed\n")
                    await _respond(stream, connection, answer, extra=[("Allow", "GET, HEAD")])
                else:
                    await _respond(stream, connection, await route(), head=event.method == b"HEAD")
            except h11.RemoteProtocolError as exc:
                if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    answer = (exc.error_status_hint, TEXT, b"Bad Request\n")
                    await _respond(stream, connection, answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def serve_metrics_port(
    host: str,
    port: int,
    routes: Mapping[bytes, Route],
    *,
    keys: tuple[str, bool] = NO_KEYS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``host``:``port`` until cancelled; ``keys`` are the
    config keys of the address, for the :class:`~iii.errors.BindError`."""
    listeners = await open_tcp_listeners("metrics port", host, port, keys)
    bound = listeners[0].socket.getsockname()[1]
    paths = ", ".join(path.decode() for path in routes)
    log.info("metrics port on http://%s:%d (%s)", host, bound, paths)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_one(stream, routes)
        except Exception:
            log.exception("metrics port request failed")

    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
