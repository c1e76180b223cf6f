"""The metrics port: on only when asked for; ``/healthz`` and ``/readyz`` beside ``/metrics``.

* The port is opened only when the observability entry asks for it
  (``prometheus_enabled: true``, or a ``prometheus_port`` / ``prometheus_host``):
  an upstream config (which has none of these keys) opens no port upstream
  does not have.
* ``/healthz`` answers 200 while the process serves; ``/readyz`` answers 200
  once every module is ready and the worker port is bound, 503 before
  (``starting``) and during shutdown (``shutting_down``).
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import trio

import tests.gated_module
from iii.engine import Engine
from iii.serve import serve_engine
from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.modules.test_observability import OTEL

GATED = "test::GatedModule"


def otel(**keys: Any) -> dict[str, Any]:
    return {"class": OTEL, "config": {"enabled": False, **keys}}


async def http(port: int, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh socket (the port answers one per connection)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    ("keys", "listens"),
    [
        ({}, False),  # an upstream config: no prometheus_* key
        ({"prometheus_enabled": True, "prometheus_port": 0}, True),
        ({"prometheus_port": 0}, True),  # a port given is a port asked for
        ({"prometheus_port": 0, "prometheus_enabled": False}, False),
    ],
)
async def test_the_metrics_port_opens_only_when_asked_for(
    keys: dict[str, Any], listens: bool
) -> None:
    async with open_test_engine(make_config([otel(**keys)])) as engine:
        module = engine.modules["observability"]
        assert module.config.prometheus_enabled is listens
        assert (module.prometheus_port is not None) is listens


async def test_readyz_follows_the_engine_healthz_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import iii.modules as modules_registry

    spec = modules_registry.ModuleSpec(GATED, "gated", "tests.gated_module")
    monkeypatch.setitem(modules_registry.MODULE_SPECS, GATED, spec)
    gate = trio.Event()
    monkeypatch.setattr(tests.gated_module, "GATE", gate)
    config = make_config([otel(prometheus_port=0), {"class": GATED}], shutdown_grace_ms=60_000)
    engine = Engine(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_engine(config, handle_signals=False, engine=engine))
        with trio.fail_after(10):
            while getattr(engine.modules.get("observability"), "prometheus_port", None) is None:
                await trio.sleep(0.01)
        port = engine.modules["observability"].prometheus_port

        # Starting: the metrics port serves, the gated module is not ready.
        status, headers, body = await http(port, "/readyz")
        assert status == 503 and headers["content-type"] == "application/json"
        assert orjson.loads(body)["status"] == "starting"
        status, _, body = await http(port, "/healthz")
        assert status == 200 and orjson.loads(body)["status"] == "ok"

        gate.set()
        with trio.fail_after(10):
            await engine.ready.wait()
        status, _, body = await http(port, "/readyz")
        ready = orjson.loads(body)
        assert status == 200 and ready["status"] == "ready", ready
        assert ready["worker_port"] == engine.listen_port
        assert {"observability", "gated"} <= set(ready["modules"])
        status, _, body = await http(port, "/readyz", "HEAD")
        assert status == 200 and body == b""
        assert (await http(port, "/metrics"))[0] == 200

        # Shutting down: a call in flight holds the drain open; not ready, still alive.
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await owner.send({"type": "registerfunction", "id": "t::hold"})
            with trio.fail_after(5):
                while "t::hold" not in engine.registry.functions:
                    await trio.sleep(0.01)
            held = str(uuid.uuid4())
            call = {"invocation_id": held, "function_id": "t::hold"}
            await caller.send({"type": "invokefunction", **call, "data": {}})
            await owner.receive_type("invokefunction")
            engine.request_shutdown()
            with trio.fail_after(5):
                await engine.shutting_down.wait()
            status, _, body = await http(port, "/readyz")
            assert status == 503 and orjson.loads(body)["status"] == "shutting_down"
            assert (await http(port, "/healthz"))[0] == 200
            await owner.send({"type": "invocationresult", **call, "result": 1})


async def test_other_paths_and_methods_on_the_metrics_port() -> None:
    async with open_test_engine(make_config([otel(prometheus_port=0)])) as engine:
        port = engine.modules["observability"].prometheus_port
        status, _, body = await http(port, "/health")
        assert status == 404 and b"/metrics, /healthz, /readyz" in body
        status, headers, _ = await http(port, "/readyz", "POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
