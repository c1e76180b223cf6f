"""Hostile answers to HTTP requests, against a real ``python -m iii serve``.

A raw WebSocket worker answers HTTP-triggered calls every way a broken or
hostile function can mix the two answer paths (the returned value, and the
response channel of spec protocol.md §7.4): Motia 1.0's order (streamed and
returned, the value read first), a channel opened and never finished, control
frames after the head, garbage and oversized control frames, invalid headers,
an error after a status, a channel claimed after the value answered, a
returned value with a header HTTP cannot carry.

Each time the client gets one whole, deterministic answer, every request of a
round shares one kept-alive connection, concurrent Motia-style requests all
get their streamed status, the engine keeps serving, its log holds no line
longer than a bounded snippet of what the peer sent, and SIGTERM stops it
with status 0.  (The pauses in the handlers only make one order of the two
sockets likely; the answers asserted hold in any order.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, wrap_client_stream

from iii.testing import RawWorker
from tests.modules.rest_api.helpers import request_on
from tests.support import EngineProcess, reserve_port

pytestmark = pytest.mark.sdk

TIMEOUT_MS = 1000  # the REST module's default_timeout: a stream that never ends gets 504
MAX_LOG_LINE = 1000  # the snippets of peer values quoted in warnings are 200 characters


def control(kind: str, **fields: Any) -> str:
    return orjson.dumps({"type": kind, **fields}).decode()


def result_of(message: dict[str, Any], value: Any = None, error: Any = None) -> dict[str, Any]:
    reply = {
        "type": "invocationresult",
        "invocation_id": message["invocation_id"],
        "function_id": message["function_id"],
    }
    reply.update({"error": error} if error is not None else {"result": value})
    return reply


@asynccontextmanager
async def raw_socket(engine: EngineProcess, path: str = "/") -> AsyncIterator[RawWorker]:
    """A WebSocket over a TCP stream this test owns and closes.

    (trio-websocket 0.12's client leaves its socket open when the server
    closes first, as the engine does when it removes a channel.)
    """
    stream = await trio.open_tcp_stream("127.0.0.1", engine.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
            try:
                yield RawWorker(ws)
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


def channel_path(ref: dict[str, str]) -> str:
    return f"/ws/channels/{ref['channel_id']}?key={ref['access_key']}&dir={ref['direction']}"


Handler = Callable[[EngineProcess, RawWorker, dict[str, Any]], Awaitable[None]]


async def motia(engine: EngineProcess, worker: RawWorker, message: dict[str, Any]) -> None:
    """Streamed and returned, the value sent before the body (Motia 1.0 on 0.9.0)."""
    async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
        await side.send(control("set_status", status_code=202))
        await side.send(control("set_headers", headers={"X-Step": "accept"}))
        await worker.send(result_of(message, {"status": 202, "body": {"accepted": True}}))
        await trio.sleep(0.05)
        await side.ws.send_message(b'{"accepted": true}')


async def never_closed(engine: EngineProcess, worker: RawWorker, message: dict[str, Any]) -> None:
    """The channel opened, a value returned, the stream never finished: 504."""
    async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
        await side.send(control("set_status", status_code=202))
        await worker.send(result_of(message, {"status_code": 200, "body": "not the answer"}))
        try:
            await side.ws.get_message()  # until the engine removes the channel
        except ConnectionClosed:
            pass


async def late_control(engine: EngineProcess, worker: RawWorker, message: dict[str, Any]) -> None:
    """Status and headers sent after the head: ignored, the body goes on."""
    async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
        await side.send(control("set_status", status_code=201))
        await side.ws.send_message(b"one,")
        await side.send(control("set_status", status_code=500))
        await side.send(control("set_headers", headers={"X-Late": "yes"}))
        await side.ws.send_message(b"two")
    await worker.send(result_of(message, None))


async def garbage(engine: EngineProcess, worker: RawWorker, message: dict[str, Any]) -> None:
    """Control frames that are not JSON, of unknown or huge type, out of range."""
    async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
        await side.send("not json " * 20000)
        await side.send(control("x" * 200_000))
        await side.send(control("set_status", status_code="2" * 100_000))
        await side.send(control("set_status", status_code=99))
        await side.send(control("set_headers", headers=["no colon " * 10_000]))
        await side.send(control("set_headers", headers=7))
        await side.ws.send_message(b"ok")
    await worker.send(result_of(message, None))


async def bad_headers(engine: EngineProcess, worker: RawWorker, message: dict[str, Any]) -> None:
    """A header name HTTP cannot carry: 500, the connection kept."""
    async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
        await side.send(control("set_headers", headers={"bad name\r\n" + "x" * 100_000: "v"}))
        await side.ws.send_message(b"never sent")
    await worker.send(result_of(message, None))


async def error_after_status(
    engine: EngineProcess, worker: RawWorker, message: dict[str, Any]
) -> None:
    """A status streamed, then the call fails, then a body arrives: 500 only."""
    async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
        await side.send(control("set_status", status_code=201))
        await worker.send(result_of(message, error={"code": "boom", "message": "failed"}))
        await trio.sleep(0.05)
        try:
            await side.ws.send_message(b"too late")
        except ConnectionClosed:
            pass


async def late_claim(engine: EngineProcess, worker: RawWorker, message: dict[str, Any]) -> None:
    """The value answers; the channel opened afterwards is gone: nothing changes."""
    await worker.send(result_of(message, {"status_code": 201, "body": {"by": "value"}}))
    await trio.sleep(0.05)
    try:
        async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
            await side.send(control("set_status", status_code=500))
            await side.ws.send_message(b"too late")
    except* (HandshakeError, ConnectionClosed):
        pass  # refused: 404, the channel was removed with its request


async def closed_without_body(
    engine: EngineProcess, worker: RawWorker, message: dict[str, Any]
) -> None:
    """A status, a value that says otherwise, a close without body: the stream's status."""
    async with raw_socket(engine, channel_path(message["data"]["response"])) as side:
        await side.send(control("set_status", status_code=202))
        await worker.send(result_of(message, {"status_code": 500, "body": "not the answer"}))
        await trio.sleep(0.05)


async def bad_value_headers(
    engine: EngineProcess, worker: RawWorker, message: dict[str, Any]
) -> None:
    """A returned value with a header HTTP cannot carry: 500."""
    headers = {"bad name " + "y" * 100_000: "v"}
    await worker.send(result_of(message, {"status_code": 200, "headers": headers, "body": 1}))


HANDLERS: dict[str, Handler] = {
    "h::motia": motia,
    "h::never_closed": never_closed,
    "h::late_control": late_control,
    "h::garbage": garbage,
    "h::bad_headers": bad_headers,
    "h::error_after_status": error_after_status,
    "h::late_claim": late_claim,
    "h::closed_without_body": closed_without_body,
    "h::bad_value_headers": bad_value_headers,
}

# path -> (status, a header that must be there or None, body or None to skip)
EXPECTED: dict[str, tuple[int, tuple[bytes, bytes] | None, bytes | None]] = {
    "/h/motia": (202, (b"x-step", b"accept"), b'{"accepted": true}'),
    "/h/never_closed": (504, (b"content-type", b"application/json"), None),
    "/h/late_control": (201, None, b"one,two"),
    "/h/garbage": (200, None, b"ok"),
    "/h/bad_headers": (500, (b"content-type", b"application/json"), None),
    "/h/error_after_status": (500, (b"content-type", b"application/json"), None),
    "/h/late_claim": (201, None, b'{"by":"value"}'),
    "/h/closed_without_body": (202, None, b""),
    "/h/bad_value_headers": (500, (b"content-type", b"application/json"), None),
}


async def register_routes(worker: RawWorker) -> None:
    for function_id in HANDLERS:
        await worker.send({"type": "registerfunction", "id": function_id})
        await worker.send(
            {
                "type": "registertrigger",
                "id": function_id + "-trigger",
                "trigger_type": "http",
                "function_id": function_id,
                "config": {"api_path": "/h/" + function_id[3:], "http_method": "GET"},
            }
        )
    with trio.fail_after(15):
        while True:
            reply = await worker.call("engine::triggers::list", {}, timeout=10)
            ids = {t["id"] for t in reply["result"]["triggers"]}
            if {f + "-trigger" for f in HANDLERS} <= ids:
                return
            await trio.sleep(0.05)


async def serve_calls(engine: EngineProcess, worker: RawWorker) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            message = await worker.receive_type("invokefunction", timeout=3600)
            nursery.start_soon(HANDLERS[message["function_id"]], engine, worker, message)


async def one_round(port: int) -> None:
    """Every scenario once, in order, on one kept-alive connection."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = h11.Connection(h11.CLIENT)
        for path, (status, header, body) in EXPECTED.items():
            got_status, headers, got_body = await request_on(stream, client, path)
            assert got_status == status, (path, got_status, got_body[:200])
            if header is not None:
                assert headers.get(header[0]) == header[1], (path, headers)
            if body is not None:
                assert got_body == body, (path, got_body[:200])


async def test_mixed_answers_are_deterministic_and_keep_the_connection(tmp_path: Path) -> None:
    rest_port = reserve_port()
    rest = {"port": rest_port, "host": "127.0.0.1", "default_timeout": TIMEOUT_MS}
    engine = EngineProcess.write(
        tmp_path, {"modules": [{"class": "modules::api::RestApiModule", "config": rest}]}
    )
    engine.start()
    try:
        await engine.started()
        async with raw_socket(engine) as worker:
            await worker.receive_type("workerregistered")
            await register_routes(worker)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, engine, worker)
                for _ in range(3):
                    await one_round(rest_port)

                # Concurrent Motia-style requests, each on its own connection.
                statuses: list[int] = []

                async def one_motia() -> None:
                    async with await trio.open_tcp_stream("127.0.0.1", rest_port) as stream:
                        client = h11.Connection(h11.CLIENT)
                        for _ in range(3):
                            status, _, body = await request_on(stream, client, "/h/motia")
                            assert body == b'{"accepted": true}'
                            statuses.append(status)

                with trio.fail_after(60):
                    async with trio.open_nursery() as clients:
                        for _ in range(16):
                            clients.start_soon(one_motia)
                assert statuses == [202] * 48
                nursery.cancel_scope.cancel()

        # The engine still serves, and stops cleanly.
        async with raw_socket(engine) as client_ws:
            await client_ws.receive_type("workerregistered")
            assert "result" in await client_ws.call("engine::functions::list", {}, timeout=10)
        code = await trio.to_thread.run_sync(engine.terminate, 30.0)
        assert code == 0, engine.log_text()[-3000:]
    finally:
        engine.kill()
    log = engine.log_text()
    assert "Traceback" not in log, log[-3000:]
    longest = max(len(line) for line in log.splitlines())
    assert longest < MAX_LOG_LINE, longest
    assert "can't handle event type" not in log  # no second answer on a finished response
