"""The Prometheus scrape endpoint: ``GET /metrics`` in the text exposition format.

A small HTTP/1.1 server on trio + h11 (``prometheus_client``'s own server runs
in a thread, outside trio's supervision).  Each connection is served in the
server's nursery with a deadline; one request per connection (``Connection:
close``).  Anything but ``GET``/``HEAD /metrics`` gets 404 or 405.  The body
comes from the awaitable ``render`` (the observability module refreshes the
modules' I/O-backed numbers, then runs ``prometheus_client.generate_latest``
over its registry).

Lifetime: :func:`serve_prometheus` runs in the observability module's nursery
until cancelled; ``task_status.started`` gives the bound port.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import h11
import trio

from iii.binding import NO_KEYS, open_tcp_listeners

__all__ = ["serve_prometheus", "CONTENT_TYPE"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_DEADLINE = 10.0
MAX_REQUEST_BYTES = 16 * 1024


async def _respond(
    stream: trio.SocketStream,
    connection: h11.Connection,
    status: int,
    body: bytes,
    head: bool = False,
) -> None:
    headers = [
        ("Content-Type", CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}.get(status, b"Bad Request")
    data = connection.send(h11.Response(status_code=status, headers=headers, reason=reason))
    if not head:
        data += connection.send(h11.Data(data=body))
    data += connection.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _serve_one(stream: trio.SocketStream, render: Callable[[], Awaitable[bytes]]) -> None:
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
                path = event.target.split(b"?", 1)[0]
                if path != b"/metrics":
                    await _respond(stream, connection, 404, b"Not Found: try /metrics\n")
                elif event.method not in (b"GET", b"HEAD"):
                    await _respond(stream, connection, 405, b"Method Not Allowed\n")
                else:
                    body = await render()
                    await _respond(stream, connection, 200, body, head=event.method == b"HEAD")
            except h11.RemoteProtocolError as exc:
                if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(stream, connection, exc.error_status_hint, b"Bad Request\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def serve_prometheus(
    host: str,
    port: int,
    render: Callable[[], Awaitable[bytes]],
    *,
    keys: tuple[str, bool] = NO_KEYS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await open_tcp_listeners("metrics port", host, port, keys)
    bound = listeners[0].socket.getsockname()[1]
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_one(stream, render)
        except Exception:
            log.exception("metrics request failed")

    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
