"""Connection faults (issue 10 row 1): an exception in any connection's task ends
that connection only, and the engine keeps serving everyone else.

Each example runs one engine (REST and stream modules on) in one trio run (no
hypothesis-trio), with a bystander worker and a bystander stream client
connected.  It then injects one exception (of several types) into one kind of
connection task, at one point: when the task starts, or in the middle of its
work (after the victim's first exchange went through).  The fault is
injected by test-side patching of the task's function, and fires in the
first task of that kind that starts after it is armed: the victim's.

Afterwards:

* the victim ended: its socket is closed (a faulted call ends only that call:
  the calling worker keeps its connection);
* the bystanders were not touched: the same bystander worker still calls, the
  same bystander stream client still gets events;
* the engine serves: a fresh worker registers a function and is called
  through the engine, the REST port answers a request (``/health``: 404, as
  the port has no built-in route), a fresh stream client joins.

Every kind is covered by an explicit example; hypothesis draws the rest.
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import orjson
import trio
import wsproto.utilities
from hypothesis import example, given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

import iii.channel_conn
import iii.listener
import iii.worker_calls
from iii.engine import Engine
from iii.frame_writer import FrameWriter
from iii.modules.rest_api.dispatch import RestDispatcher
from iii.modules.rest_api.protocol import HttpConnection
from iii.modules.stream.server import StreamServer
from iii.testing import RawWorker, connect_test_worker, make_config, open_test_engine
from iii.worker_conn import WorkerConnection

ERRORS: dict[str, Callable[[], BaseException]] = {
    "ValueError": lambda: ValueError("injected"),
    "KeyError": lambda: KeyError("injected"),
    "TypeError": lambda: TypeError("injected"),
    "AssertionError": lambda: AssertionError("injected"),
    "RecursionError": lambda: RecursionError("injected"),
    "OSError": lambda: OSError(errno.ECONNRESET, "injected"),
    "BrokenResourceError": lambda: trio.BrokenResourceError("injected"),
    "LocalProtocolError": lambda: wsproto.utilities.LocalProtocolError("injected"),
    "ExceptionGroup": lambda: ExceptionGroup("injected", [ValueError("a"), KeyError("b")]),
}

# kind -> (object, attribute): the task function the fault goes into.
TARGETS: dict[str, tuple[Any, str]] = {
    "worker reader": (WorkerConnection, "_reader"),
    "worker writer": (FrameWriter, "run"),
    "worker heartbeat": (WorkerConnection, "_heartbeat"),
    "call task": (iii.worker_calls, "_run_call"),
    "channel side": (iii.channel_conn, "_pump_from_socket"),
    "otel socket": (iii.listener, "_serve_telemetry"),
    "stream reader": (StreamServer, "_reader"),
    "stream writer": (StreamServer, "_writer"),
    "stream join": (StreamServer, "_join"),
    "http request": (RestDispatcher, "__call__"),
    "http connection": (HttpConnection, "serve"),
}
POINTS = ("start", "during")
SCENARIO_LIMIT = 30


class Fault:
    """One exception, for the first task that starts after :meth:`arm`."""

    def __init__(self, error: Callable[[], BaseException], point: str):
        self.error = error
        self.point = point
        self.armed = False
        self.fired = trio.Event()
        self.go = trio.Event()  # "during": the victim's first exchange went through

    def wrap(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def task(*args: Any, **kwargs: Any) -> Any:
            if not self.armed:
                return await original(*args, **kwargs)
            self.armed = False
            if self.point == "start":
                self.fired.set()
                raise self.error()
            async with trio.open_nursery() as nursery:
                finished = trio.Event()

                async def run() -> None:
                    await original(*args, **kwargs)
                    finished.set()

                nursery.start_soon(run)
                await _first_of(self.go, finished)
                self.fired.set()
                raise self.error()

        return task


async def _first_of(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


@contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


# -- peers ---------------------------------------------------------------------------------


async def http_get(port: int, path: str = "/health") -> int:
    """The status of one request (0 if the connection was closed without an answer)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        response = b""
        try:
            while chunk := await stream.receive_some(65536):
                response += chunk
        except trio.BrokenResourceError:
            pass
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


@asynccontextmanager
async def stream_client(port: int) -> AsyncIterator[WebSocketConnection]:
    """A stream client over a socket this helper owns and always closes (trio-websocket's
    client leaves its socket open when the server closes first)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/")
        yield ws
        nursery.cancel_scope.cancel()


async def stream_join(ws: Any, sub: str, group: str = "g") -> dict[str, Any]:
    data = {"subscriptionId": sub, "streamName": "s", "groupId": group}
    await ws.send_message(orjson.dumps({"type": "join", "data": data}).decode())
    with trio.fail_after(5):
        message: dict[str, Any] = orjson.loads(await ws.get_message())
    return message


async def ended(ws: Any) -> bool:
    """True once the engine has closed the victim's socket."""
    with trio.move_on_after(5):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            return True
    return False


async def serve_function(worker: RawWorker, function_id: str) -> None:
    """Register ``function_id`` on ``worker`` and answer its calls with their data."""
    await worker.send({"type": "registerfunction", "id": function_id})
    while True:
        call = await worker.receive_type("invokefunction", timeout=60)
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": call["invocation_id"],
                "function_id": function_id,
                "result": call["data"],
            }
        )


# -- the victims -------------------------------------------------------------------------------


async def victim_worker(engine: Engine, fault: Fault, kind: str) -> None:
    async with connect_test_worker(engine) as victim:
        try:
            await victim.send({"type": "ping"})
            await victim.receive_type("pong")
            fault.go.set()
            await victim.send({"type": "ping"})
            await victim.receive_type("pong")
        except (ConnectionClosed, trio.TooSlowError):
            pass
        assert await ended(victim.ws), f"the {kind} fault did not end its connection"


async def victim_call(engine: Engine, fault: Fault) -> None:
    release = trio.Event()

    async def slow(data: Any, ctx: Any) -> Any:
        fault.go.set()
        await release.wait()
        return data

    engine.register_function("test::slow", slow)
    async with connect_test_worker(engine) as victim:
        call = {"function_id": "test::slow", "data": 1, "invocation_id": str(uuid.uuid4())}
        await victim.send({"type": "invokefunction", **call})
        with trio.fail_after(5):
            await fault.fired.wait()
        release.set()
        # Only the call ended: the connection that made it still works.
        assert "result" in await victim.call("engine::functions::list", {})


async def victim_channel(engine: Engine, fault: Fault) -> None:
    channel = engine.channels.create()
    path = f"/ws/channels/{channel.channel_id}?key={channel.access_key}&dir=write"
    async with connect_test_worker(engine, path, handshake=False) as victim:
        try:
            await victim.send("frame")
            if fault.point == "during":
                with trio.fail_after(5):
                    assert await channel.receive_side.receive() == "frame"
            fault.go.set()
        except ConnectionClosed:
            pass
        assert await ended(victim.ws), "the channel fault did not end its socket"


async def victim_otel(engine: Engine, fault: Fault) -> None:
    async with connect_test_worker(engine, "/otel", handshake=False) as victim:
        try:
            await victim.send(b"OTLP{}")
            fault.go.set()
        except ConnectionClosed:
            pass
        assert await ended(victim.ws), "the /otel fault did not end its socket"


async def victim_stream(engine: Engine, fault: Fault, port: int) -> None:
    async with stream_client(port) as victim:
        try:
            await stream_join(victim, "victim")
            fault.go.set()
            await stream_join(victim, "victim2")
        except (ConnectionClosed, trio.TooSlowError):
            pass
        assert await ended(victim), "the stream client fault did not end its connection"


async def victim_http(fault: Fault, port: int) -> None:
    fault.go.set()
    # "during": the request may have been answered before the fault.
    assert await http_get(port) in ((0, 500) if fault.point == "start" else (0, 404, 500))


# -- the scenario ---------------------------------------------------------------------------------


async def _scenario(kind: str, error: str, point: str) -> None:
    config = make_config(
        [
            {"class": "modules::api::RestApiModule", "config": {"port": 0, "host": "127.0.0.1"}},
            {"class": "modules::stream::StreamModule", "config": {"port": 0, "host": "127.0.0.1"}},
        ],
        heartbeat_interval_ms=100,
        heartbeat_timeout_ms=5000,
    )
    fault = Fault(ERRORS[error], point)
    target, name = TARGETS[kind]
    with patched(target, name, fault.wrap(getattr(target, name))):
        async with open_test_engine(config) as engine:
            stream_port = engine.modules["stream"].server.listen_port
            rest_port = engine.modules["rest_api"].port
            async with (
                connect_test_worker(engine) as bystander,
                stream_client(stream_port) as watcher,
            ):
                assert (await stream_join(watcher, "w"))["event"]["type"] == "sync"
                fault.armed = True
                if kind.startswith("worker "):
                    await victim_worker(engine, fault, kind)
                elif kind == "call task":
                    await victim_call(engine, fault)
                elif kind == "channel side":
                    await victim_channel(engine, fault)
                elif kind == "otel socket":
                    await victim_otel(engine, fault)
                elif kind.startswith("stream "):
                    await victim_stream(engine, fault, stream_port)
                else:
                    await victim_http(fault, rest_port)
                assert fault.fired.is_set(), f"the {kind} fault never fired"

                # The bystanders were not touched.
                assert "result" in await bystander.call("engine::functions::list", {})
                item = {"stream_name": "s", "group_id": "g", "item_id": "i", "data": 1}
                await engine.invoke("stream::set", item)
                with trio.fail_after(5):
                    update = orjson.loads(await watcher.get_message())
                assert update["event"]["type"] == "create"

                # The engine serves newcomers.
                async with connect_test_worker(engine) as fresh, trio.open_nursery() as serving:
                    serving.start_soon(serve_function, fresh, "fresh::echo")
                    with trio.fail_after(5):
                        while "fresh::echo" not in engine.registry.functions:
                            await trio.sleep(0.01)
                    answer = await bystander.call("fresh::echo", {"n": 1})
                    expected = {"n": 1, "_caller_worker_id": bystander.worker_id}
                    assert answer.get("result") == expected
                    serving.cancel_scope.cancel()
                assert await http_get(rest_port) == 404  # answered: no route
                async with stream_client(stream_port) as newcomer:
                    assert (await stream_join(newcomer, "n"))["event"]["type"] == "sync"


async def _bounded(kind: str, error: str, point: str) -> None:
    with trio.fail_after(SCENARIO_LIMIT):
        await _scenario(kind, error, point)


def _examples(test: Any) -> Any:
    """One explicit example per kind (and both points), so every kind is always covered."""
    names = sorted(ERRORS)
    for index, kind in enumerate(TARGETS):
        test = example(kind=kind, error=names[index % len(names)], point=POINTS[index % 2])(test)
    return test


@_examples
@given(
    kind=st.sampled_from(sorted(TARGETS)),
    error=st.sampled_from(sorted(ERRORS)),
    point=st.sampled_from(POINTS),
)
def test_a_fault_in_a_connection_task_ends_that_connection_only(
    kind: str, error: str, point: str
) -> None:
    trio.run(partial(_bounded, kind, error, point))
