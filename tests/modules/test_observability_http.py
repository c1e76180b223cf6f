"""One HTTP request, one trace: the REST server span, the engine's invocation
span and the SDK worker's own span, parent to child (issue: observability)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.modules.test_observability import OTEL, attributes, flatten, ok
from tests.support import start_sdk_worker

pytestmark = pytest.mark.sdk

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"

WORKER = """
import sys, time
from iii import register_worker, InitOptions

iii = register_worker(sys.argv[1], InitOptions(worker_name="http-traced"))

def hello(req):
    return {"status_code": 201, "body": {"hi": req["path_params"]["name"]}}

iii.register_function("traced::hello", hello)
iii.register_trigger({"type": "http", "function_id": "traced::hello",
                      "config": {"api_path": "/hello/:name", "http_method": "GET"}})
print("READY", flush=True)
time.sleep(600)
"""


async def test_http_request_trace_holds_server_invocation_and_worker_spans() -> None:
    config = make_config(
        modules=[
            {
                "class": OTEL,
                "config": {"enabled": True, "exporter": "memory", "memory_max_spans": 5000},
            },
            {"class": "modules::api::RestApiModule", "config": {"port": 0, "host": "127.0.0.1"}},
        ]
    )
    async with open_test_engine(config) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        env = {"OTEL_ENABLED": "true", "OTEL_SERVICE_NAME": "http-traced-worker"}
        async with start_sdk_worker("0.25.0", WORKER, url=url, env=env) as sdk:
            await sdk.wait_for("READY", timeout=40)
            rest_port = engine.modules["rest_api"].port
            with trio.fail_after(30):
                while not engine.registry.triggers:
                    await trio.sleep(0.05)
            async with httpx.AsyncClient() as client:
                response = await client.get(
                    f"http://127.0.0.1:{rest_port}/hello/ann",
                    headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"},
                    timeout=20,
                )
            assert response.status_code == 201 and response.json() == {"hi": "ann"}

            async with connect_test_worker(engine) as probe:
                with trio.fail_after(30):
                    while True:
                        tree = await ok(probe, "engine::traces::tree", {"trace_id": TRACE})
                        nodes = flatten(tree["roots"])
                        if any(s["service_name"] == "http-traced-worker" for _, s in nodes):
                            break
                        await trio.sleep(0.1)

    by_name: dict[str, Any] = {}
    for depth, span in nodes:
        by_name.setdefault(span["name"], (depth, span))
    depth_http, http_span = by_name["GET /hello/:name"]
    depth_call, call_span = by_name["call traced::hello"]
    assert http_span["parent_span_id"] == CLIENT_SPAN  # the client's context is honoured
    assert call_span["parent_span_id"] == http_span["span_id"]
    worker_spans = [s for _, s in nodes if s["service_name"] == "http-traced-worker"]
    assert any(s.get("parent_span_id") == call_span["span_id"] for s in worker_spans), nodes
    assert attributes(http_span)["http.response.status_code"] == 201
    assert attributes(http_span)["http.route"] == "/hello/:name"
    assert all(s["trace_id"] == TRACE for _, s in nodes)
