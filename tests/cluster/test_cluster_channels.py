"""HTTP requests forwarded to a worker on another engine, with streamed bodies (channels bridged)."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import orjson
import pytest

from iii.engine import Engine
from tests.cluster.helpers import open_cluster, wait_for
from tests.modules.rest_api.helpers import (
    add_route,
    open_channel_side,
    open_worker,
    read_channel,
    rest_module,
)

# Cluster membership lives in Redis.
pytestmark = pytest.mark.services


async def test_a_streamed_request_and_a_streamed_response_cross_engines() -> None:
    async with open_cluster(2, modules=[rest_module()]) as (a, b):

        async def upload(data: Any) -> Any:
            async with open_channel_side(b, data["request_body"], "read") as side:
                blob = b"".join(
                    f if isinstance(f, bytes) else f.encode() for f in await read_channel(side)
                )
            return {"body": {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}

        async def events(data: Any) -> Any:
            async with open_channel_side(b, data["response"], "write") as side:
                await side.send(orjson.dumps({"type": "set_status", "status_code": 201}).decode())
                await side.send(
                    orjson.dumps(
                        {"type": "set_headers", "headers": {"Content-Type": "text/event-stream"}}
                    ).decode()
                )
                await side.ws.send_message(b"data: one\n\n")
                await side.ws.send_message(b"data: two\n\n")
            return None

        async with open_worker(b, {"t::up": upload, "t::sse": events}) as worker:
            await add_route(b, worker, "t::up", "/up", "PUT")
            await add_route(b, worker, "t::sse", "/events", "GET")
            await wait_for(lambda: len(a.modules["rest_api"].routes) == 2)
            base = f"http://127.0.0.1:{a.modules['rest_api'].port}"
            blob = bytes(range(256)) * 1024 + b"tail"
            async with httpx.AsyncClient(base_url=base) as client:
                response = await client.put(
                    "/up", content=blob, headers={"content-type": "application/octet-stream"}
                )
                assert response.status_code == 200, response.text
                assert response.json() == {
                    "size": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest(),
                }
                streamed = await client.get("/events")
                assert streamed.status_code == 201
                assert streamed.headers["content-type"] == "text/event-stream"
                assert streamed.content == b"data: one\n\ndata: two\n\n"
            await wait_for(lambda: no_channels(a) and no_channels(b))


def no_channels(engine: Engine) -> bool:
    return len(engine.channels) == 0
