"""Issue 10, rows 8, 11 and 13, replayed against a real engine process.

``python -m iii serve`` runs as a child process (:class:`~tests.support.EngineProcess`);
the attacks come over real sockets: raw TCP on the REST port, raw WebSocket
clients on the worker port.  Each test then checks that the engine still serves.

* row 11, request smuggling: framing a proxy could read differently is answered
  once with an error, the connection closes, and nothing pipelined behind it
  reaches a function;
* row 8, channel memory: a writer with no reader cannot make the engine buffer
  more than ``channel_buffer_bytes``, memory is given back as soon as both sides
  are gone, and ``engine::channels::create`` past ``max_channels`` is an error;
* row 13 is replayed through the real CLI in ``tests/test_cli.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from iii.testing import RawWorker
from tests.support import EngineProcess, reserve_port, wait_for_port

# -- helpers --------------------------------------------------------------------------


@asynccontextmanager
async def running_engine(tmp_path, **engine_keys: Any) -> AsyncIterator[tuple[EngineProcess, int]]:
    """An engine process with the REST module; yields it and its REST port."""
    rest_port = reserve_port()
    engine = EngineProcess.write(
        tmp_path,
        {
            **engine_keys,
            "modules": [
                {
                    "class": "modules::api::RestApiModule",
                    "config": {"port": rest_port, "host": "127.0.0.1"},
                }
            ],
        },
    )
    engine.start()
    try:
        await engine.started()
        await wait_for_port(rest_port)
        yield engine, rest_port
    finally:
        engine.kill()


@asynccontextmanager
async def open_ws(port: int, path: str) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket whose TCP stream is closed on exit, whoever closed first.

    (trio-websocket's ``open_websocket`` leaves the socket to the garbage
    collector when the server sends its Close first, which the engine's
    channel sockets do: a ResourceWarning, an error under this suite's
    ``filterwarnings = error``.)
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def raw_worker(engine: EngineProcess) -> AsyncIterator[RawWorker]:
    async with open_ws(engine.port, "/") as ws:
        worker = RawWorker(ws)
        registered = await worker.receive(timeout=10)
        worker.worker_id = registered["worker_id"]
        yield worker


async def serve_echo_route(worker: RawWorker, calls: list[Any]) -> None:
    """Register POST /echo and answer every call to it (recorded in ``calls``)."""
    await worker.send({"type": "registerfunction", "id": "hostile::echo"})
    await worker.send(
        {
            "type": "registertrigger",
            "id": str(uuid.uuid4()),
            "trigger_type": "http",
            "function_id": "hostile::echo",
            "config": {"api_path": "/echo", "http_method": "POST"},
        }
    )
    while True:
        message = await worker.receive_type("invokefunction", timeout=3600)
        calls.append(message.get("data"))
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": message["function_id"],
                "result": {"status_code": 200, "body": {"echo": True}},
            }
        )


async def http_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes to the REST port and read until the server closes."""
    data = b""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request)
        with trio.fail_after(15):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def wait_for_route(port: int) -> None:
    """Until POST /echo answers 200 (the trigger is registered)."""
    with trio.fail_after(15):
        while True:
            reply = await http_exchange(
                port,
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            if reply.startswith(b"HTTP/1.1 200 "):
                return
            await trio.sleep(0.05)


# -- row 11: request smuggling ----------------------------------------------------------

PIPELINED = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nsmuggled!"

SMUGGLING = {
    "CL+TE": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "bare LF": (b"POST /echo HTTP/1.1\nHost: x\nContent-Length: 0\n\n", 400),
    "HTTP/0.9": (b"POST /echo\r\n\r\n", 400),
    "HTTP/2.0": (b"POST /echo HTTP/2.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 505),
    "obs-fold": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        400,
    ),
    "TE Chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two Content-Lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 9\r\n\r\n",
        400,
    ),
}


async def test_smuggled_requests_are_answered_once_and_never_reach_a_function(tmp_path):
    calls: list[Any] = []
    async with running_engine(tmp_path) as (engine, rest_port), raw_worker(engine) as worker:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_echo_route, worker, calls)
            await wait_for_route(rest_port)
            calls.clear()
            for name, (attack, status) in SMUGGLING.items():
                reply = await http_exchange(rest_port, attack + PIPELINED)
                assert reply.startswith(f"HTTP/1.1 {status} ".encode()), (name, reply[:300])
                assert reply.count(b"HTTP/1.1 ") == 1, (name, reply)  # then closed
                assert calls == [], name  # neither request reached the function
            # The engine still serves an ordinary request.
            await wait_for_route(rest_port)
            assert len(calls) == 1
            assert engine.process is not None and engine.process.poll() is None
            nursery.cancel_scope.cancel()


# -- row 8: channel memory --------------------------------------------------------------

MiB = 1024 * 1024


async def create_channel(worker: RawWorker, **data: Any) -> dict[str, Any]:
    return await worker.call("engine::channels::create", data, timeout=10)


def channel_path(ref: dict[str, str]) -> str:
    return f"/ws/channels/{ref['channel_id']}?key={ref['access_key']}&dir={ref['direction']}"


async def test_a_writer_with_no_reader_is_held_back_by_bytes_not_frames(tmp_path):
    """The issue's attack: ``buffer_size: 1024`` and big frames, nobody reading.

    With the default ``channel_buffer_bytes`` (4 MiB) the engine stops reading
    the writer's socket after a few frames (plus what the kernel buffers);
    before, it took 1,024 frames of any size, and trio-websocket 64 more.
    """
    frames = 48  # of 1 MiB: the writer must be held back well before the end
    async with running_engine(tmp_path) as (engine, _), raw_worker(engine) as worker:
        refs = (await create_channel(worker, buffer_size=1024))["result"]
        sent = 0
        writer_path = channel_path(refs["writer"])
        async with open_ws(engine.port, writer_path) as writer, trio.open_nursery() as nursery:

            async def write_all() -> None:
                nonlocal sent
                for index in range(frames):
                    await writer.send_message(index.to_bytes(4, "big") * (MiB // 4))
                    sent += 1
                await writer.aclose()

            nursery.start_soon(write_all)
            with trio.fail_after(120):
                while True:  # until the writer makes no progress for 2 s
                    before = sent
                    await trio.sleep(2)
                    if sent in (before, frames):
                        break
            held_back_at = sent
            assert held_back_at < frames // 2, f"the engine took {held_back_at} MiB with no reader"
            # A reader then gets every frame, in order: backpressure lost nothing.
            async with open_ws(engine.port, channel_path(refs["reader"])) as reader:
                with trio.fail_after(60):
                    for index in range(frames):
                        frame = await reader.get_message()
                        assert frame == index.to_bytes(4, "big") * (MiB // 4)
        # The engine is still there, and serves.
        assert "result" in await create_channel(worker)
        assert engine.process is not None and engine.process.poll() is None


async def test_a_finished_channel_frees_its_slot_at_once_and_the_limit_holds(tmp_path):
    async with running_engine(tmp_path, max_channels=2) as (engine, _), raw_worker(engine) as w:
        used = (await create_channel(w))["result"]
        await create_channel(w)
        refused = await create_channel(w)
        assert refused["error"]["code"] == "too_many_channels", refused
        async with open_ws(engine.port, channel_path(used["writer"])) as writer:
            await writer.send_message(b"x" * 1000)
        async with open_ws(engine.port, channel_path(used["reader"])) as reader:
            assert await reader.get_message() == b"x" * 1000
        # Both sides are gone: the slot comes back now, not at the 60 s sweep.
        with trio.fail_after(10):
            while "error" in (reply := await create_channel(w)):
                assert reply["error"]["code"] == "too_many_channels"
                await trio.sleep(0.05)
        assert engine.process is not None and engine.process.poll() is None
