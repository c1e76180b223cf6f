"""Test helpers: an engine in the test's nursery, and raw protocol clients.

* :func:`open_test_engine` runs :func:`~iii.engine.serve_engine` on an
  ephemeral loopback port with only the modules asked for (the mandatory ones
  are always there), and shuts it down gracefully on exit.
* :func:`connect_test_worker` connects a :class:`RawWorker` to it over an
  in-memory stream pair (no socket), through the same upgrade routing as the
  real listener; ``path`` picks ``/``, ``/otel`` or a channel.
* :func:`connect_loopback_worker` does the same over a real TCP socket.

A :class:`RawWorker` speaks JSON dicts: ``send`` / ``receive`` /
``receive_type``.  It is how unit tests act as a worker without an SDK.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import orjson
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket

from iii.config import EngineConfig, parse_config
from iii.engine import Engine
from iii.listener import connection_options, handle_upgrade
from iii.serve import serve_engine
from iii.wsconnection import open_client_connection
from iii.wsserver import serve_socket

__all__ = [
    "open_test_engine",
    "make_config",
    "connect_test_worker",
    "connect_loopback_worker",
    "RawWorker",
]


def make_config(modules: list[dict[str, Any]] | None = None, **engine_keys: Any) -> EngineConfig:
    """A config with the given module entries, listening on an ephemeral port."""
    config = parse_config({"modules": modules or [], **engine_keys})
    return attrs.evolve(config, port=0)


@asynccontextmanager
async def open_test_engine(config: EngineConfig | None = None) -> AsyncIterator[Engine]:
    config = config or make_config()
    async with trio.open_nursery() as nursery:
        engine: Engine = await nursery.start(
            lambda task_status: serve_engine(config, handle_signals=False, task_status=task_status)
        )
        try:
            yield engine
        finally:
            engine.request_shutdown()


@attrs.define(eq=False)
class RawWorker:
    ws: WebSocketConnection
    worker_id: str | None = None
    backlog: list[dict[str, Any]] = attrs.field(factory=list)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = orjson.dumps(message).decode()
        await self.ws.send_message(message)

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        with trio.fail_after(timeout):
            frame = await self.ws.get_message()
        decoded: dict[str, Any] = orjson.loads(frame)
        return decoded

    async def receive_type(self, type_tag: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of that type; others received meanwhile are kept."""
        for index, message in enumerate(self.backlog):
            if message.get("type") == type_tag:
                return self.backlog.pop(index)
        with trio.fail_after(timeout):
            while True:
                frame = await self.ws.get_message()
                message = orjson.loads(frame)
                if message.get("type") == type_tag:
                    return message  # type: ignore[no-any-return]
                self.backlog.append(message)

    async def call(
        self, function_id: str, data: Any = None, timeout: float = 5.0, **extra: Any
    ) -> dict[str, Any]:
        """Invoke with a fresh invocation id and wait for its result."""
        import uuid

        invocation_id = str(uuid.uuid4())
        await self.send(
            {
                "type": "invokefunction",
                "function_id": function_id,
                "data": data,
                "invocation_id": invocation_id,
                **extra,
            }
        )
        with trio.fail_after(timeout):
            while True:
                result = await self.receive_type("invocationresult", timeout)
                if result["invocation_id"] == invocation_id:
                    return result
                self.backlog.append(result)

    async def aclose(self) -> None:
        await self.ws.aclose()


@asynccontextmanager
async def connect_test_worker(
    engine: Engine, path: str = "/", *, handshake: bool = True
) -> AsyncIterator[RawWorker]:
    """A raw worker over an in-memory stream; waits for ``workerregistered``."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    assert engine.connection_nursery is not None

    # Served as the listener serves a socket (supervised, counted, closed
    # when the handler returns), under the address "memory".
    engine.connection_nursery.start_soon(
        partial(
            serve_socket,
            server_stream,
            partial(handle_upgrade, engine),
            admission=engine.sockets,
            options=connection_options(engine),
            port_name="worker port",
        )
    )
    async with trio.open_nursery() as nursery:
        ws = await open_client_connection(nursery, client_stream, "engine", path)
        worker = RawWorker(ws)
        if handshake and path == "/":
            registered = await worker.receive()
            assert registered["type"] == "workerregistered", registered
            worker.worker_id = registered["worker_id"]
        try:
            yield worker
        finally:
            await ws.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect_loopback_worker(engine: Engine, path: str = "/") -> AsyncIterator[RawWorker]:
    """A raw worker over a real TCP connection to the engine's port."""
    assert engine.listen_port is not None
    async with open_websocket("127.0.0.1", engine.listen_port, path, use_ssl=False) as ws:
        worker = RawWorker(ws)
        if path == "/":
            registered = await worker.receive()
            worker.worker_id = registered["worker_id"]
        yield worker
