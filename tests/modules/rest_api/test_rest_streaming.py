"""Request and response bodies through channels, with raw channel sockets."""

from __future__ import annotations

import hashlib

import httpx
import orjson
import trio

from tests.modules.rest_api.helpers import (
    add_route,
    open_channel_side,
    open_rest_engine,
    open_worker,
    read_channel,
    wait_until,
)


async def test_request_body_streams_to_the_function_in_small_chunks():
    sizes = []

    async def upload(data):
        assert data["body"] is None
        async with open_channel_side(engine, data["request_body"], "read") as side:
            frames = await read_channel(side)
        sizes.extend(len(f) for f in frames)
        blob = b"".join(frames)
        return {"body": {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}

    blob = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4
    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::up": upload}) as worker,
    ):
        await add_route(engine, worker, "t::up", "/up", "PUT")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.put(
                "/up", content=blob, headers={"content-type": "application/octet-stream"}
            )
        assert response.json() == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        assert max(sizes) <= 64 * 1024


async def test_body_over_the_limit_mid_stream_is_413():
    async def upload(data):
        async with open_channel_side(engine, data["request_body"], "read") as side:
            await read_channel(side)
        return {"body": "read it all"}

    async def chunks():  # no content-length: chunked, so the limit hits mid-stream
        for _ in range(10):
            yield b"y" * 1000

    async with (
        open_rest_engine(max_body_size=5000) as (engine, base),
        open_worker(engine, {"t::up": upload}) as worker,
    ):
        await add_route(engine, worker, "t::up", "/up", "POST")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.post("/up", content=chunks())
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_streamed_response_with_status_headers_and_events():
    first_seen = trio.Event()

    async def events(data):
        async with open_channel_side(engine, data["response"], "write") as side:
            await side.send(orjson.dumps({"type": "set_status", "status_code": 201}).decode())
            await side.send(
                orjson.dumps(
                    {
                        "type": "set_headers",
                        "headers": {"Content-Type": "text/event-stream", "X-Id": "7"},
                    }
                ).decode()
            )
            await side.ws.send_message(b"data: one\n\n")
            await first_seen.wait()  # the client has the first event before the second exists
            await side.ws.send_message(b"data: two\n\n")
        return None

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::sse": events}) as worker,
    ):
        await add_route(engine, worker, "t::sse", "/events")
        async with httpx.AsyncClient(base_url=base) as client:
            async with client.stream("GET", "/events") as response:
                assert response.status_code == 201
                assert response.headers["content-type"] == "text/event-stream"
                assert response.headers["x-id"] == "7"
                assert response.headers["transfer-encoding"] == "chunked"
                received = b""
                async for chunk in response.aiter_raw():
                    received += chunk
                    if received == b"data: one\n\n":
                        first_seen.set()
                assert received == b"data: one\n\ndata: two\n\n"
        await wait_until(lambda: len(engine.channels) == 0)  # removed as the request ends


async def test_streamed_download_of_one_mebibyte():
    blob = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB

    async def download(data):
        async with open_channel_side(engine, data["response"], "write") as side:
            await side.send(
                orjson.dumps(
                    {"type": "set_headers", "headers": ["Content-Type: application/pdf"]}
                ).decode()
            )
            for offset in range(0, len(blob), 64 * 1024):
                await side.ws.send_message(blob[offset : offset + 64 * 1024])
        return None

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::dl": download}) as worker,
    ):
        await add_route(engine, worker, "t::dl", "/file")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/file")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/pdf"
        assert response.content == blob


async def test_status_only_stream_and_head_request():
    async def empty(data):
        async with open_channel_side(engine, data["response"], "write") as side:
            await side.send(orjson.dumps({"type": "set_status", "status_code": 204}).decode())
        return None

    async def simple(data):
        return {"body": {"method": data["method"]}}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::empty": empty, "t::simple": simple}) as worker,
    ):
        await add_route(engine, worker, "t::empty", "/empty", "DELETE")
        await add_route(engine, worker, "t::simple", "/simple")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.delete("/empty")
            assert (response.status_code, response.content) == (204, b"")
            response = await client.head("/simple")  # a GET route answers HEAD, without a body
            assert response.status_code == 200
            assert response.content == b""
            assert response.headers["content-length"] == str(len(b'{"method":"HEAD"}'))


async def test_function_error_after_status_frames_is_500():
    opened = trio.Event()
    release = trio.Event()

    async def hold_response_open(ref):
        async with open_channel_side(engine, ref, "write") as side:
            await side.send(orjson.dumps({"type": "set_status", "status_code": 201}).decode())
            opened.set()
            await release.wait()

    async def half(data):
        holder.start_soon(hold_response_open, data["response"])
        await opened.wait()
        raise RuntimeError("failed before any body")

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::half": half}) as worker,
    ):
        async with trio.open_nursery() as holder:
            await add_route(engine, worker, "t::half", "/half")
            async with httpx.AsyncClient(base_url=base) as client:
                response = await client.get("/half")
            release.set()
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "INTERNAL_ERROR"


async def test_client_leaving_mid_stream_ends_the_request():
    stop_streaming = trio.Event()

    async def endless(data):
        async with open_channel_side(engine, data["response"], "write") as side:
            await side.send(
                orjson.dumps(
                    {"type": "set_headers", "headers": {"content-type": "text/event-stream"}}
                ).decode()
            )
            with trio.move_on_after(10):
                while not stop_streaming.is_set():
                    await side.ws.send_message(b"data: tick\n\n")
                    await trio.sleep(0.01)
        return None

    async def ping(data):
        return {"body": "pong"}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::endless": endless, "t::ping": ping}) as worker,
    ):
        await add_route(engine, worker, "t::endless", "/endless")
        await add_route(engine, worker, "t::ping", "/ping")
        port = engine.modules["rest_api"].port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        with trio.fail_after(5):
            while b"data: tick" not in received:
                received += await stream.receive_some(65536)
        assert received.startswith(b"HTTP/1.1 200 ")
        await stream.aclose()  # leave in the middle of the stream
        # The request ends on the engine side: its channels go, nothing is in flight.
        await wait_until(lambda: len(engine.channels) == 0 and engine.inflight == 0)
        stop_streaming.set()
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/ping")).json() == "pong"


async def test_a_stream_that_never_starts_is_504_and_its_side_task_ends():
    """The function opens the response channel and then goes quiet: the
    request's deadline answers 504 and ends the response reader with it."""
    release = trio.Event()

    async def silent(data):
        async with open_channel_side(engine, data["response"], "write"):
            await release.wait()
        return None

    async with (
        open_rest_engine(default_timeout=500) as (engine, base),
        open_worker(engine, {"t::silent": silent}) as worker,
    ):
        await add_route(engine, worker, "t::silent", "/silent")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/silent")
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "TIMEOUT"
        await wait_until(lambda: len(engine.channels) == 0 and engine.inflight == 0)
        release.set()
