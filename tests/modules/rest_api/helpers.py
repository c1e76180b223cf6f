"""Shared pieces of the REST tests: an engine with the REST module on an
ephemeral port, a raw worker that answers calls with Python handlers, and
requests on one kept-alive connection (:func:`request_on`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import h11
import trio

from iii.engine import Engine
from iii.testing import RawWorker, connect_test_worker, make_config, open_test_engine

Handler = Callable[[Any], Awaitable[Any]]


def rest_module(**config: Any) -> dict[str, Any]:
    return {
        "class": "modules::api::RestApiModule",
        "config": {"port": 0, "host": "127.0.0.1", **config},
    }


@asynccontextmanager
async def open_rest_engine(**rest_config: Any) -> AsyncIterator[tuple[Engine, str]]:
    """An engine with only the REST module (and the mandatory ones); yields (engine, base URL)."""
    async with open_test_engine(make_config([rest_module(**rest_config)])) as engine:
        port = engine.modules["rest_api"].port
        yield engine, f"http://127.0.0.1:{port}"


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def add_route(
    engine: Engine,
    worker: RawWorker,
    function_id: str,
    api_path: str,
    method: str = "GET",
    *,
    trigger_id: str | None = None,
    **extra: Any,
) -> str:
    """Register a function and an http trigger for it; waits until the route is live."""
    if function_id not in engine.registry.functions:
        await worker.send({"type": "registerfunction", "id": function_id})
    trigger_id = trigger_id or str(uuid.uuid4())
    routes = engine.modules["rest_api"].routes
    before = len(routes)
    await worker.send(
        {
            "type": "registertrigger",
            "id": trigger_id,
            "trigger_type": "http",
            "function_id": function_id,
            "config": {"api_path": api_path, "http_method": method, **extra},
        }
    )
    await wait_until(lambda: len(routes) > before and function_id in engine.registry.functions)
    return trigger_id


async def answer_calls(worker: RawWorker, handlers: dict[str, Handler]) -> None:
    """Answer every ``invokefunction`` for ``handlers`` until cancelled (each in its own task)."""

    async def answer(message: dict[str, Any]) -> None:
        handler = handlers[message["function_id"]]
        reply: dict[str, Any] = {
            "type": "invocationresult",
            "invocation_id": message["invocation_id"],
            "function_id": message["function_id"],
        }
        try:
            reply["result"] = await handler(message.get("data"))
        except Exception as exc:
            reply["error"] = {"code": "invocation_failed", "message": str(exc)}
        await worker.send(reply)

    async with trio.open_nursery() as nursery:
        while True:
            message = await worker.receive_type("invokefunction", timeout=3600)
            nursery.start_soon(answer, message)


@asynccontextmanager
async def open_worker(engine: Engine, handlers: dict[str, Handler]) -> AsyncIterator[RawWorker]:
    """A raw worker answering calls with ``handlers`` in the background."""
    async with connect_test_worker(engine) as worker, trio.open_nursery() as nursery:
        nursery.start_soon(answer_calls, worker, handlers)
        try:
            yield worker
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_channel_side(
    engine: Engine, ref: dict[str, str], direction: str
) -> AsyncIterator[RawWorker]:
    """One side of a channel over the engine's ``/ws/channels`` route, as a raw socket."""
    path = f"/ws/channels/{ref['channel_id']}?key={ref['access_key']}&dir={direction}"
    async with connect_test_worker(engine, path, handshake=False) as side:
        yield side


async def read_channel(side: RawWorker) -> list[str | bytes]:
    """Every frame until the engine closes the channel."""
    from trio_websocket import ConnectionClosed

    frames: list[str | bytes] = []
    with trio.fail_after(10):
        while True:
            try:
                frames.append(await side.ws.get_message())
            except ConnectionClosed:
                return frames


async def request_on(
    stream: trio.SocketStream,
    client: h11.Connection,
    path: str,
    method: str = "GET",
    body: bytes = b"",
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on a kept-alive connection (``client`` is its h11 state):
    (status, headers, body).  A connection the server ends fails the test."""
    head = [(b"host", b"test"), (b"content-length", str(len(body)).encode())]
    if body:
        head.append((b"content-type", b"application/json"))
    request = h11.Request(method=method, target=path, headers=head)
    data = client.send(request) + (client.send(h11.Data(data=body)) if body else b"")
    await stream.send_all(data + client.send(h11.EndOfMessage()))
    status, headers, answer = 0, {}, b""
    with trio.fail_after(10):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                answer += event.data
            elif isinstance(event, h11.EndOfMessage):
                client.start_next_cycle()
                return status, headers, answer
            else:
                raise AssertionError(f"connection ended: {event!r}")
