"""The REST module with official SDK workers (0.4.1, 0.9.0 and 0.25.0) behind it.

Each SDK runs the same set of HTTP handlers, written with its own helpers
(``HttpResponse`` in 0.4.1 and 0.9.0, ``StreamResponse`` in 0.25, spec
protocol.md §7.4), and httpx plays the client.  A 0.9.0 handler written the
way Motia 1.0 answers (it streams its answer *and* returns it) gets its
streamed answer to the client every time, on one kept-alive connection.
"""

from __future__ import annotations

import hashlib
import json
import logging

import h11
import httpx
import pytest
import trio

from iii.testing import make_config, open_test_engine
from tests.modules.rest_api.helpers import rest_module, wait_until
from tests.support import start_sdk_worker

pytestmark = pytest.mark.sdk

BLOB = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB

HANDLERS = """
import asyncio, hashlib, json, logging, sys

logging.basicConfig(stream=sys.stdout, format="LOG %(message)s", level=logging.WARNING)
BLOB = hashlib.sha256(b"seed").digest() * 32768

async def get_item(req):
    return {"status_code": 200, "body": {
        "id": req["path_params"]["id"], "q": req["query_params"], "path": req["path"],
        "method": req["method"], "agent": req["headers"].get("x-agent"),
        "trigger": req["trigger"]}}

async def echo(req):
    return {"status_code": 201, "body": {"got": req["body"]},
            "headers": {"X-Echo": "yes", "Cache-Control": "no-store"}}

async def upload(req):
    digest, size = hashlib.sha256(), 0
    async for chunk in req["request_body"]:
        digest.update(chunk)
        size += len(chunk)
    return {"status_code": 200, "body": {"size": size, "sha256": digest.hexdigest(),
            "content_type": req["headers"].get("content-type")}}

async def raw_body(req):
    data = await req["request_body"].read_all()
    return {"status_code": 200, "body": {"content_type": req["headers"].get("content-type"),
            "raw": data.decode("utf-8", "replace"), "parsed": req["body"]}}

async def download(req):
    response = Response(req["response"])
    await response.status(200)
    await response.headers({"content-type": "application/octet-stream", "x-size": str(len(BLOB))})
    await req["response"].write(BLOB)
    await req["response"].close_async()
    return None

async def events(req):
    response = Response(req["response"])
    await response.headers({"content-type": "text/event-stream", "cache-control": "no-cache"})
    for i in range(3):
        await req["response"].write(f"id: {i}\\ndata: event {i}\\n\\n".encode())
        await asyncio.sleep(0.05)
    await req["response"].close_async()
    return None

async def slow(req):
    await asyncio.sleep(20)
    return {"status_code": 200, "body": "late"}

async def other(req):
    return {"status_code": 200, "body": "other"}

ROUTES = [
    ("rest::get", get_item, "/rest/items/:id", "GET"),
    ("rest::echo", echo, "/rest/echo", "POST"),
    ("rest::upload", upload, "/rest/upload", "post"),
    ("rest::raw", raw_body, "rest/raw", "POST"),
    ("rest::download", download, "/rest/download", "GET"),
    ("rest::events", events, "/rest/events", "GET"),
    ("rest::slow", slow, "/rest/slow", "GET"),
]
"""

WORKER_041 = (
    HANDLERS
    + """
from iii import III, InitOptions
from iii.types import HttpResponse as Response

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name="rest041"))
    triggers = {}
    for function_id, handler, path, method in ROUTES:
        iii.register_function(function_id, handler)
        triggers[function_id] = iii.register_trigger(
            "http", function_id, {"api_path": path, "http_method": method})
    await iii.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        if cmd["op"] == "unregister":
            triggers.pop(cmd["fn"]).unregister()
        elif cmd["op"] == "conflict":
            iii.register_function("rest::other", other)
            iii.register_trigger("http", "rest::other", {"api_path": "/rest/items/:other", "http_method": "GET"})
        print("OK", flush=True)

asyncio.run(main())
"""
)

WORKER_025 = (
    HANDLERS
    + """
from iii import register_worker, InitOptions
from iii.types import StreamResponse as Response

iii = register_worker(sys.argv[1], InitOptions(worker_name="rest025", otel={"enabled": False}))
triggers = {}
for function_id, handler, path, method in ROUTES:
    iii.register_function(function_id, handler)
    triggers[function_id] = iii.register_trigger(
        {"type": "http", "function_id": function_id, "config": {"api_path": path, "http_method": method}})
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "unregister":
        triggers.pop(cmd["fn"]).unregister()
    elif cmd["op"] == "conflict":
        iii.register_function("rest::other", other)
        iii.register_trigger({"type": "http", "function_id": "rest::other",
                              "config": {"api_path": "/rest/items/:other", "http_method": "GET"}})
    print("OK", flush=True)
iii.shutdown()
"""
)

WORKER_090 = (
    HANDLERS
    + """
from iii import register_worker, InitOptions
from iii.types import HttpResponse as Response

iii = register_worker(sys.argv[1], InitOptions(worker_name="rest090"))
triggers = {}
for function_id, handler, path, method in ROUTES:
    iii.register_function({"id": function_id}, handler)
    triggers[function_id] = iii.register_trigger(
        {"type": "http", "function_id": function_id, "config": {"api_path": path, "http_method": method}})
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "unregister":
        triggers.pop(cmd["fn"]).unregister()
    elif cmd["op"] == "conflict":
        iii.register_function({"id": "rest::other"}, other)
        iii.register_trigger({"type": "http", "function_id": "rest::other",
                              "config": {"api_path": "/rest/items/:other", "http_method": "GET"}})
    print("OK", flush=True)
iii.shutdown()
"""
)

SCRIPTS = {"0.4.1": WORKER_041, "0.9.0": WORKER_090, "0.25.0": WORKER_025}
VERSIONS = pytest.mark.parametrize("version", list(SCRIPTS))


def rest_routes(engine):
    return engine.modules["rest_api"].routes


async def start(engine, version, nursery_stack):
    worker = await nursery_stack.enter_async_context(
        start_sdk_worker(version, SCRIPTS[version], url=f"ws://127.0.0.1:{engine.listen_port}")
    )
    await worker.wait_for("READY", timeout=60)
    await wait_until(lambda: len(rest_routes(engine)) == 7, timeout=20)
    return worker


@VERSIONS
async def test_http_round_trips_through_an_sdk_worker(version):
    from contextlib import AsyncExitStack

    config = make_config([rest_module(default_timeout=4000)])
    async with open_test_engine(config) as engine, AsyncExitStack() as stack:
        await start(engine, version, stack)
        base = f"http://127.0.0.1:{engine.modules['rest_api'].port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            # GET with path and query parameters
            response = await client.get(
                "/rest/items/42",
                params=[("q", "a"), ("q", "b"), ("x", "1")],
                headers={"X-Agent": "tester"},
            )
            assert response.status_code == 200
            assert response.json() == {
                "id": "42",
                "q": {"q": "b", "x": "1"},
                "path": "/rest/items/:id",
                "method": "GET",
                "agent": "tester",
                "trigger": {"type": "http", "path": "/rest/items/:id", "method": "GET"},
            }

            # POST JSON, custom status and headers
            response = await client.post("/rest/echo", json={"name": "iii", "n": [1, 2.5, None]})
            assert response.status_code == 201
            assert response.json() == {"got": {"name": "iii", "n": [1, 2.5, None]}}
            assert response.headers["x-echo"] == "yes"
            assert response.headers["cache-control"] == "no-store"

            # 1 MiB upload streamed through the request_body channel
            response = await client.post(
                "/rest/upload", content=BLOB, headers={"content-type": "application/octet-stream"}
            )
            assert response.json() == {
                "size": len(BLOB),
                "sha256": hashlib.sha256(BLOB).hexdigest(),
                "content_type": "application/octet-stream",
            }

            # 1 MiB download streamed through the response channel
            response = await client.get("/rest/download")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/octet-stream"
            assert response.headers["x-size"] == str(len(BLOB))
            assert response.content == BLOB

            # form-urlencoded: raw bytes in the channel, body null
            response = await client.post("/rest/raw", data={"a": "1", "b": "x y&z"})
            result = response.json()
            assert result["content_type"] == "application/x-www-form-urlencoded"
            assert result["raw"] == "a=1&b=x+y%26z"
            assert result["parsed"] is None

            # multipart/form-data
            response = await client.post(
                "/rest/raw",
                data={"field": "value"},
                files={"upload": ("notes.txt", b"hello multipart", "text/plain")},
            )
            result = response.json()
            assert result["content_type"].startswith("multipart/form-data; boundary=")
            boundary = result["content_type"].split("boundary=")[1]
            assert result["raw"].startswith("--" + boundary)
            assert 'name="upload"; filename="notes.txt"' in result["raw"]
            assert "hello multipart" in result["raw"]
            assert 'name="field"' in result["raw"] and "value" in result["raw"]

            # server-sent events, read as they come
            async with client.stream("GET", "/rest/events") as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                events = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            assert events == ["event 0", "event 1", "event 2"]

            # CORS preflight on an SDK route (permissive by default)
            response = await client.options(
                "/rest/echo",
                headers={
                    "Origin": "https://ui.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "*"
            assert response.headers["access-control-allow-methods"] == "POST"
            response = await client.post(
                "/rest/echo", json={}, headers={"Origin": "https://ui.example"}
            )
            assert response.headers["access-control-allow-origin"] == "*"

            # a handler slower than default_timeout: 504
            response = await client.get("/rest/slow")
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "TIMEOUT"

            # and the engine still serves
            assert (await client.get("/rest/items/7")).json()["id"] == "7"


@VERSIONS
async def test_routes_follow_the_worker(version):
    from contextlib import AsyncExitStack

    async with open_test_engine(make_config([rest_module()])) as engine, AsyncExitStack() as stack:
        worker = await start(engine, version, stack)
        base = f"http://127.0.0.1:{engine.modules['rest_api'].port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            # A conflicting route of another function is refused; the engine keeps serving.
            await worker.send_line(json.dumps({"op": "conflict"}))
            await worker.wait_for("OK")
            await wait_until(lambda: "rest::other" in engine.registry.functions)
            if version == "0.25.0":  # 0.25 logs the triggerregistrationresult error
                line = await worker.wait_for("LOG [iii] Trigger registration failed")
                assert "conflicts with GET /rest/items/:id of function rest::get" in line
            else:  # 0.4.1 and 0.9.0 ignore it; the engine never filed the trigger
                await wait_until(
                    lambda: (
                        not any(
                            t.function_id == "rest::other"
                            for t in engine.registry.triggers.values()
                        )
                    )
                )
            assert all(r.function_id != "rest::other" for r in rest_routes(engine).by_key.values())
            assert (await client.get("/rest/items/1")).json()["id"] == "1"

            # 404 once the trigger is unregistered
            await worker.send_line(json.dumps({"op": "unregister", "fn": "rest::echo"}))
            await worker.wait_for("OK")
            await wait_until(lambda: len(rest_routes(engine)) == 6)
            response = await client.post("/rest/echo", json={})
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "NOT_FOUND"

            # 404 once the worker is gone
            worker.kill()
            await wait_until(lambda: len(rest_routes(engine)) == 0, timeout=10)
            response = await client.get("/rest/items/1")
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "NOT_FOUND"


# What Motia 1.0's runtime does with a step's return value, on the 0.9.0 SDK's
# own ``http`` helper (captured on the wire: README, "What iii-sdk 0.9.0
# sends"): set_status and set_headers (awaited), the body and the close (each
# a task of its own, fire and forget), then the same value returned.
WORKER_090_MOTIA = """
import json, logging, sys
from iii import register_worker, InitOptions, http

logging.basicConfig(stream=sys.stdout, format="LOG %(message)s", level=logging.WARNING)

def answer(result):
    async def handler(req, res):
        await res.status(result["status"])
        if result.get("headers"):
            await res.headers(result["headers"])
        if result.get("body") is not None:
            res.stream.write(json.dumps({**result["body"], "got": req.body}).encode())
        res.close()
        return result
    return handler

ROUTES = [
    ("motia::accept", {"status": 202, "body": {"accepted": True}, "headers": {"X-Step": "accept"}},
     "/accept", "POST"),
    ("motia::missing", {"status": 404, "body": {"error": "no such item"}}, "/missing", "GET"),
    ("motia::empty", {"status": 204}, "/empty", "DELETE"),
]
iii = register_worker(sys.argv[1], InitOptions(worker_name="motia090"))
for function_id, result, path, method in ROUTES:
    iii.register_function({"id": function_id}, http(answer(result)))
    iii.register_trigger({"type": "http", "function_id": function_id,
                          "config": {"api_path": path, "http_method": method}})
print("READY", flush=True)
sys.stdin.read()
iii.shutdown()
"""


async def test_sdk_090_streamed_and_returned_answer_is_the_streamed_one(caplog):
    from tests.modules.rest_api.helpers import request_on

    caplog.set_level(logging.WARNING, logger="iii")
    async with open_test_engine(make_config([rest_module()])) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker("0.9.0", WORKER_090_MOTIA, url=url) as worker:
            await worker.wait_for("READY", timeout=60)
            await wait_until(lambda: len(rest_routes(engine)) == 3, timeout=20)
            port = engine.modules["rest_api"].port
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                client = h11.Connection(h11.CLIENT)  # one kept-alive connection for all
                for n in range(10):
                    status, headers, body = await request_on(
                        stream, client, "/accept", "POST", json.dumps({"n": n}).encode()
                    )
                    assert (status, headers.get(b"x-step")) == (202, b"accept")
                    assert json.loads(body) == {"accepted": True, "got": {"n": n}}
                    status, headers, body = await request_on(stream, client, "/missing")
                    assert (status, json.loads(body)) == (
                        404,
                        {"error": "no such item", "got": None},
                    )
                    status, headers, body = await request_on(stream, client, "/empty", "DELETE")
                    assert (status, body) == (204, b"")
            assert not [line for line in worker.seen if line.startswith("LOG ")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
