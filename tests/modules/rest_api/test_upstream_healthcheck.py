"""The official 0.25 Python SDK suite's healthcheck test, ported, against the default config.

Upstream's ``sdk/packages/python/iii/tests/test_healthcheck.py`` (iii-hq/iii)
registers a function, expects ``GET /health`` to answer **404** (the REST
port has no built-in route), binds it to ``api_path: health`` (no leading
slash), expects 200 with the handler's body within 5 s, unregisters both and
expects 404 again within 5 s.  Here the same steps run in a real 0.25.0 SDK
worker process (``III`` with ``_wait_until_connected``, then 0.3 s, as
upstream's conftest does; httpx stands in for aiohttp, which that SDK does
not install), against a real ``python -m iii serve`` whose config is the
default one: every default module with its default config, only the ports
moved to free ones (other engines may hold 49134, 3111 and 3112 here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from iii.modules import DEFAULT_MODULES
from tests.support import EngineProcess, reserve_port, start_sdk_worker

pytestmark = pytest.mark.sdk

HEALTHCHECK_025 = r"""
import asyncio, sys, time
import httpx
from iii import InitOptions
from iii.iii import III

ENGINE_HTTP_URL = sys.argv[2]

async def get_health():
    async with httpx.AsyncClient() as session:
        resp = await session.get(f"{ENGINE_HTTP_URL}/health")
        try:
            body = resp.json()
        except Exception:
            body = {}
        return resp.status_code, body

async def healthcheck(iii_client):
    async def healthcheck_handler(_req):
        return {"status_code": 200, "body": {
            "status": "healthy", "timestamp": "2026-01-01T00:00:00Z", "service": "iii-sdk-test"}}

    fn = iii_client.register_function("test.healthcheck.py", healthcheck_handler)

    status_before, body_before = await get_health()
    assert status_before == 404, f"before registering: {status_before} {body_before}"

    trigger = iii_client.register_trigger({
        "type": "http",
        "function_id": fn.id,
        "config": {
            "api_path": "health", "http_method": "GET", "description": "Healthcheck endpoint"},
    })
    await asyncio.sleep(0.3)

    async def assert_healthy():
        status, data = await get_health()
        assert status == 200, f"registered: {status} {data}"
        assert data["status"] == "healthy"
        assert data["service"] == "iii-sdk-test"
        assert "timestamp" in data

    deadline = asyncio.get_event_loop().time() + 5.0
    while True:
        try:
            await assert_healthy()
            break
        except AssertionError:
            if asyncio.get_event_loop().time() >= deadline:
                raise
            await asyncio.sleep(0.1)

    fn.unregister()
    trigger.unregister()
    await asyncio.sleep(0.3)

    deadline = asyncio.get_event_loop().time() + 5.0
    while True:
        status_after, _ = await get_health()
        if status_after == 404:
            break
        if asyncio.get_event_loop().time() >= deadline:
            raise AssertionError(f"Expected 404 after unregister, got {status_after}")
        await asyncio.sleep(0.1)

client = III(sys.argv[1], InitOptions(worker_name="iii-test-client"))
client._wait_until_connected()
time.sleep(0.3)
try:
    asyncio.run(healthcheck(client))
    print("RESULT PASS", flush=True)
except AssertionError as exc:
    print("RESULT FAIL " + str(exc), flush=True)
finally:
    client.shutdown()
"""


def default_config_with_reserved_ports() -> tuple[dict[str, object], int]:
    rest_port = reserve_port()
    moved = {
        "modules::api::RestApiModule": {"port": rest_port},
        "modules::stream::StreamModule": {"port": reserve_port()},
    }
    modules = [{"class": name, "config": moved.get(name, {})} for name in DEFAULT_MODULES]
    return {"port": reserve_port(), "modules": modules}, rest_port


async def test_official_025_healthcheck_passes_against_the_default_config(tmp_path: Path) -> None:
    config, rest_port = default_config_with_reserved_ports()
    engine = EngineProcess.write(tmp_path, config)
    engine.start()
    try:
        await engine.started()
        async with start_sdk_worker(
            "0.25.0", HEALTHCHECK_025, url=engine.url, args=(f"http://127.0.0.1:{rest_port}",)
        ) as worker:
            result = await worker.wait_for("RESULT ", timeout=90)
        assert result == "RESULT PASS", (result, worker.seen)
    finally:
        engine.kill()
