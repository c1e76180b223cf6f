"""The REST port's behaviours over trio memory streams, no socket on the HTTP side.

The same engine and REST module as the loopback tests (:mod:`.test_rest_api`,
:mod:`.test_rest_streaming`), but each HTTP connection is one end of
:func:`trio.testing.memory_stream_pair`, served by
``HttpServer.serve_stream`` (the sans-I/O protocol of
:mod:`iii.modules.rest_api.protocol` behind it), and the routed functions are
engine-side functions, so the deadlines can run on ``autojump_clock``.
The loopback tests stay: they cover the sockets, admission and linger.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import h11
import orjson
import trio
import trio.testing

from iii.engine import Engine
from iii.native import CallContext
from iii.registry import TriggerRegistration
from iii.testing import make_config, open_test_engine
from tests.modules.rest_api.helpers import rest_module

Handler = Callable[[Any, CallContext], Awaitable[Any]]


@asynccontextmanager
async def open_engine(**rest_config: Any) -> AsyncIterator[Engine]:
    async with open_test_engine(make_config([rest_module(**rest_config)])) as engine:
        yield engine


def route(
    engine: Engine,
    function_id: str,
    api_path: str,
    handler: Handler,
    method: str = "GET",
    **extra: Any,
) -> None:
    """An engine-side function behind an ``http`` trigger."""
    engine.register_function(function_id, handler)
    error = engine.register_trigger(
        TriggerRegistration(
            worker_id=None,
            id=f"t-{uuid.uuid4().hex[:8]}",
            trigger_type="http",
            function_id=function_id,
            config={"api_path": api_path, "http_method": method, **extra},
        )
    )
    assert error is None, error


class Client:
    """One HTTP/1.1 connection over a memory stream, with a client-side h11."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def send_head(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        await self.stream.send_all(
            self.h11.send(
                h11.Request(method=method, target=path, headers=[(b"host", b"memory"), *headers])
            )
        )

    async def send_body(self, data: bytes, *, end: bool = True) -> None:
        out = self.h11.send(h11.Data(data=data)) if data else b""
        if end:
            out += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(out)

    async def events(self) -> AsyncIterator[Any]:
        """The response's events, up to and with its end."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
                continue
            yield event
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return

    async def read_response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        status, headers, body = 0, {}, b""
        async for event in self.events():
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection")
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return status, headers, body

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        head = list(headers or [])
        if not any(name == b"transfer-encoding" for name, _ in head):
            head.append((b"content-length", str(len(body)).encode()))
        await self.send_head(method, path, head)
        await self.send_body(body)
        return await self.read_response()


@asynccontextmanager
async def open_client(engine: Engine) -> AsyncIterator[Client]:
    """A connection to the REST port's server, over memory streams."""
    server = engine.modules["rest_api"].server
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end, "memory")
        try:
            yield Client(client_end)
        finally:
            await client_end.aclose()


async def test_simple_answers_on_one_kept_alive_connection() -> None:
    seen: list[Any] = []

    async def hello(data: Any, context: CallContext) -> Any:
        seen.append(data)
        return {
            "status_code": 201,
            "body": {"id": data["path_params"]["id"]},
            "headers": ["X-Kind: todo"],
        }

    async with open_engine() as engine:
        route(engine, "m::hello", "/todo/:id", hello)
        async with open_client(engine) as client:
            for i in range(3):
                status, headers, body = await client.request("GET", f"/todo/{i}?q=x&q=y")
                assert status == 201
                assert headers[b"x-kind"] == b"todo"
                assert headers[b"content-type"] == b"application/json"
                assert orjson.loads(body) == {"id": str(i)}
        assert [d["query_params"] for d in seen] == [{"q": "y"}] * 3  # the last value wins
        assert seen[0]["path"] == "/todo/:id" and seen[0]["method"] == "GET"
        assert seen[0]["headers"]["host"] == "memory"


async def test_errors_have_one_shape_404_405_500() -> None:
    async def bad(data: Any, context: CallContext) -> Any:
        return ["not", "an", "object"]

    async with open_engine() as engine:
        route(engine, "m::bad", "/bad", bad, "POST")
        async with open_client(engine) as client:
            status, _, body = await client.request("GET", "/nowhere")
            assert status == 404 and orjson.loads(body)["error"]["code"] == "NOT_FOUND"
            status, headers, body = await client.request("GET", "/bad")
            assert status == 405 and headers[b"allow"] == b"POST"
            assert orjson.loads(body)["error"]["code"] == "METHOD_NOT_ALLOWED"
            status, _, body = await client.request("POST", "/bad")
            error = orjson.loads(body)["error"]
            assert status == 500 and error["code"] == "INTERNAL_ERROR"
            assert error["message"] == "internal server error" and error["error_id"]


async def test_json_body_parsed_and_head_has_no_body() -> None:
    async def echo(data: Any, context: CallContext) -> Any:
        return {"body": {"got": data["body"], "method": data["method"]}}

    async with open_engine() as engine:
        route(engine, "m::echo", "/echo", echo, "POST")
        route(engine, "m::get", "/echo", echo, "GET")
        async with open_client(engine) as client:
            json_type = [(b"content-type", b"application/json")]
            status, _, body = await client.request("POST", "/echo", b'{"a": [1, 2]}', json_type)
            assert status == 200 and orjson.loads(body) == {"got": {"a": [1, 2]}, "method": "POST"}
            status, _, body = await client.request("POST", "/echo", b"{not json", json_type)
            assert status == 200 and orjson.loads(body)["got"] is None
            status, headers, body = await client.request("HEAD", "/echo")
            assert status == 200 and body == b"" and int(headers[b"content-length"]) > 0


async def test_body_over_the_limit_is_413_before_the_function_runs() -> None:
    calls: list[Any] = []

    async def never(data: Any, context: CallContext) -> Any:
        calls.append(data)
        return {}

    async with open_engine(max_body_size=100) as engine:
        route(engine, "m::never", "/up", never, "POST")
        async with open_client(engine) as client:
            await client.send_head("POST", "/up", [(b"content-length", b"101")])
            status, _, body = await client.read_response()
            assert status == 413 and orjson.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
        assert calls == []


async def test_null_result_without_a_channel_is_504_at_the_deadline(autojump_clock: Any) -> None:
    async def silent(data: Any, context: CallContext) -> Any:
        return None

    async with open_engine(default_timeout=30000) as engine:
        route(engine, "m::silent", "/silent", silent)
        async with open_client(engine) as client:
            start = trio.current_time()
            status, _, body = await client.request("GET", "/silent")
            assert status == 504 and orjson.loads(body)["error"]["code"] == "TIMEOUT"
            assert trio.current_time() - start >= 30  # not before the deadline (virtual clock)


async def test_streamed_answer_wins_over_the_returned_value() -> None:
    async def stream(data: Any, context: CallContext) -> Any:
        ref = data["response"]
        channel = engine.channels.lookup(ref["channel_id"], ref["access_key"])
        assert channel is not None
        writer = channel.claim_writer()
        await writer.send(orjson.dumps({"type": "set_status", "status_code": 202}).decode())
        await writer.send(
            orjson.dumps(
                {"type": "set_headers", "headers": {"Content-Type": "text/plain"}}
            ).decode()
        )
        await writer.send(b"one,")
        await writer.send(b"two")
        writer.close()
        return {"status_code": 200, "body": "the returned value"}  # a 0.9.0 SDK returns one too

    async with open_engine() as engine:
        route(engine, "m::stream", "/stream", stream)
        async with open_client(engine) as client:
            status, headers, body = await client.request("GET", "/stream")
            assert (status, body) == (202, b"one,two")
            assert headers[b"content-type"] == b"text/plain"
            assert headers[b"transfer-encoding"] == b"chunked"
            status, _, _ = await client.request("GET", "/stream")  # the connection is kept
            assert status == 202


async def test_raw_body_streams_through_the_request_channel() -> None:
    async def upload(data: Any, context: CallContext) -> Any:
        assert data["body"] is None
        ref = data["request_body"]
        channel = engine.channels.lookup(ref["channel_id"], ref["access_key"])
        assert channel is not None
        sizes = [len(frame) async for frame in channel.claim_reader()]
        return {"body": {"total": sum(sizes), "largest": max(sizes)}}

    async with open_engine() as engine:
        route(engine, "m::up", "/up", upload, "PUT")
        async with open_client(engine) as client:
            await client.send_head("PUT", "/up", [(b"transfer-encoding", b"chunked")])
            await client.send_body(b"z" * 50_000, end=False)
            await client.send_body(b"z" * 200_000, end=True)  # cut in chunks of 64 KiB
            status, _, body = await client.read_response()
            assert status == 200
            assert orjson.loads(body) == {"total": 250_000, "largest": 64 * 1024}


async def test_condition_false_is_422_and_the_function_is_not_called() -> None:
    calls: list[Any] = []

    async def gate(data: Any, context: CallContext) -> Any:
        return data["query_params"].get("let") == "in"

    async def guarded(data: Any, context: CallContext) -> Any:
        calls.append(data)
        return {"body": "in"}

    async with open_engine() as engine:
        engine.register_function("m::gate", gate)
        route(engine, "m::guarded", "/guarded", guarded, condition_function_id="m::gate")
        async with open_client(engine) as client:
            status, _, body = await client.request("GET", "/guarded?let=no")
            assert status == 422 and orjson.loads(body)["error"]["code"] == "CONDITION_NOT_MET"
            assert calls == []
            status, _, body = await client.request("GET", "/guarded?let=in")
            assert (status, orjson.loads(body)) == (200, "in")
        assert len(calls) == 1


async def test_malformed_request_is_400_and_the_connection_ends() -> None:
    async with open_engine() as engine, open_client(engine) as client:
        await client.stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
        data = b""
        with trio.fail_after(10):
            while chunk := await client.stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert orjson.loads(body)["error"]["code"] == "BAD_REQUEST"
