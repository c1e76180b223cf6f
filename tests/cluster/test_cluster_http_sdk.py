"""HTTP handlers of the official SDKs (0.4.1, 0.9.0, 0.25.0) on engine B, requested through engine A.

The handlers are those of tests/modules/rest_api/test_rest_sdk.py: JSON in
and out, a 1 MiB upload read from the ``request_body`` channel, a 1 MiB
download and server-sent events written to the ``response`` channel: the
channels cross engines (:mod:`iii.cluster_channels`).
"""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack

import httpx
import pytest

from tests.cluster.helpers import open_cluster, wait_for
from tests.modules.rest_api.helpers import rest_module
from tests.modules.rest_api.test_rest_sdk import BLOB, VERSIONS, rest_routes, start

pytestmark = [pytest.mark.sdk, pytest.mark.services]


@VERSIONS
async def test_sdk_http_handlers_on_another_engine(version: str) -> None:
    async with (
        open_cluster(2, modules=[rest_module(default_timeout=4000)]) as (a, b),
        AsyncExitStack() as stack,
    ):
        await start(b, version, stack)
        await wait_for(lambda: len(rest_routes(a)) == 7, timeout=30)
        base = f"http://127.0.0.1:{a.modules['rest_api'].port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            response = await client.get(
                "/rest/items/42", params={"q": "a"}, headers={"X-Agent": "tester"}
            )
            assert response.status_code == 200
            assert response.json()["id"] == "42" and response.json()["agent"] == "tester"
            response = await client.post("/rest/echo", json={"name": "iii"})
            assert response.status_code == 201 and response.json() == {"got": {"name": "iii"}}
            assert response.headers["x-echo"] == "yes"
            response = await client.post(
                "/rest/upload", content=BLOB, headers={"content-type": "application/octet-stream"}
            )
            assert response.json() == {
                "size": len(BLOB),
                "sha256": hashlib.sha256(BLOB).hexdigest(),
                "content_type": "application/octet-stream",
            }
            response = await client.get("/rest/download")
            assert response.status_code == 200 and response.content == BLOB
            async with client.stream("GET", "/rest/events") as response:
                assert response.status_code == 200
                events = [
                    line[6:] async for line in response.aiter_lines() if line.startswith("data: ")
                ]
            assert events == ["event 0", "event 1", "event 2"]
            response = await client.get("/rest/slow")
            assert response.status_code == 504
