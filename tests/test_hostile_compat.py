"""Compatibility fixes of issue 11, against a real ``python -m iii serve``.

* **A port someone else holds.**  Each listener (the worker port, REST,
  stream, the metrics port) finds its port taken by another process: the
  engine exits 1 with one line that names the address and the config keys
  that set it, in the file the user gave.
* **Engines side by side.**  Three engines on one host, each with the
  observability module, as upstream's SDK CI runs them: all start and serve
  (the metrics port, which upstream does not have, is opened only when a
  config asks for it).  With it asked for, ``/healthz`` and ``/readyz``
  answer there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.support import ROOT, EngineProcess, reserve_port

OTEL = "modules::observability::OtelModule"
REST = "modules::api::RestApiModule"
STREAM = "modules::stream::StreamModule"


@contextmanager
def port_held() -> Iterator[int]:
    """A loopback port that another process (here: this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def serve_once(config_path: Path) -> subprocess.CompletedProcess[bytes]:
    """``python -m iii serve -c config_path`` until it exits (it is expected to, at start)."""
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "iii", "serve", "-c", str(config_path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=config_path.parent,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def last_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


# -- a port someone else holds ---------------------------------------------------------


def _worker_port(port: int) -> tuple[dict[str, Any], str]:
    return {"port": port, "host": "127.0.0.1", "modules": []}, "config keys host and port"


def _rest(port: int) -> tuple[dict[str, Any], str]:
    modules = [{"class": REST, "config": {"host": "127.0.0.1", "port": port}}]
    return (
        {"port": reserve_port(), "modules": modules},
        "config keys modules[0].config.host and modules[0].config.port",
    )


def _stream(port: int) -> tuple[dict[str, Any], str]:
    modules = [
        {"class": REST, "config": {"host": "127.0.0.1", "port": reserve_port()}},
        {"class": STREAM, "config": {"host": "127.0.0.1", "port": port}},
    ]
    return (
        {"port": reserve_port(), "modules": modules},
        "config keys modules[1].config.host and modules[1].config.port",
    )


def _metrics(port: int) -> tuple[dict[str, Any], str]:
    modules = [{"class": OTEL, "config": {"prometheus_enabled": True, "prometheus_port": port}}]
    return (
        {"port": reserve_port(), "modules": modules},
        "config keys modules[0].config.prometheus_host and modules[0].config.prometheus_port",
    )


@pytest.mark.parametrize(
    ("what", "build"),
    [
        ("worker port", _worker_port),
        ("REST API", _rest),
        ("stream port", _stream),
        ("metrics port", _metrics),
    ],
)
async def test_a_port_in_use_names_the_address_and_the_config_keys(
    tmp_path: Path, what: str, build: Any
) -> None:
    with port_held() as port:
        config, keys = build(port)
        path = write_config(tmp_path, config)
        result = await serve_once(path)
    line = last_line(result)
    assert result.returncode == 1, result.stderr.decode(errors="replace")
    assert line.startswith("iii: cannot start: [Errno 98] "), line
    assert f"{what} cannot listen on 127.0.0.1:{port}: Address already in use" in line, line
    assert f"({keys} in {path})" in line, line


def test_bind_error_keys_of_a_default_module_say_they_are_defaults() -> None:
    from iii.config import parse_config
    from iii.errors import BindError

    config = parse_config({"port": 0})  # no modules list: the default modules
    keys = config.listen_keys(config.module_config(REST))
    cause = OSError(98, "Address in use")
    error = BindError("REST API", "0.0.0.0", 3111, keys[0], cause, in_file=keys[1])
    assert error.describe("config.yaml") == (
        "[Errno 98] REST API cannot listen on 0.0.0.0:3111: Address in use (config keys host"
        " and port of modules::api::RestApiModule: defaults, as the config lists no modules)"
    )
    engine_keys = config.listen_keys()
    cause = OSError(98, "in use")
    error = BindError("worker port", "127.0.0.1", 49134, engine_keys[0], cause, in_file=True)
    assert error.describe(None).endswith(
        "(config keys host and port: no config file, so their defaults)"
    )
    assert error.errno == 98 and isinstance(error, OSError)


# -- engines side by side --------------------------------------------------------------


def upstream_sdk_ci_configs() -> list[dict[str, Any]]:
    """The three engines of upstream's SDK CI (sdk/fixtures/config-test.yaml,
    config-bridge-backend.yaml, config-bridge.yaml, when they used ``modules:``),
    each with the observability module and no ``prometheus_*`` key.  Ports are
    free ones instead of 49199/49198/49197, 3112-3114 and 3199; the third's
    bridge adapters (not available here) are in-memory stores."""

    def kv(kind: str, **config: Any) -> dict[str, Any]:
        return {"class": f"modules::{kind}::adapters::KvStore", "config": config}

    def stream(port: int, adapter: dict[str, Any]) -> dict[str, Any]:
        return {"class": STREAM, "config": {"port": port, "host": "0.0.0.0", "adapter": adapter}}

    def state(adapter: dict[str, Any]) -> dict[str, Any]:
        return {"class": "modules::state::StateModule", "config": {"adapter": adapter}}

    pubsub = {
        "class": "modules::pubsub::PubSubModule",
        "config": {"adapter": {"class": "modules::pubsub::LocalAdapter"}},
    }
    test_otel = {
        "class": OTEL,
        "config": {
            "enabled": "${OTEL_ENABLED:true}",
            "service_name": "${OTEL_SERVICE_NAME:iii-test}",
            "exporter": "${OTEL_EXPORTER_TYPE:memory}",
            "sampling_ratio": 1.0,
            "metrics_enabled": True,
            "metrics_exporter": "${OTEL_METRICS_EXPORTER:memory}",
            "logs_exporter": "${OTEL_LOGS_EXPORTER:memory}",
            "logs_console_output": False,
        },
    }
    quiet_otel = {"class": OTEL, "config": {"enabled": False}}
    memory = {"store_method": "in_memory"}
    test = {
        "port": reserve_port(),
        "modules": [
            stream(
                reserve_port(), kv("stream", store_method="file_based", file_path="./data/stream")
            ),
            state(kv("state", store_method="file_based", file_path="./data/state.db")),
            {
                "class": REST,
                "config": {"host": "0.0.0.0", "port": reserve_port(), "default_timeout": 30000},
            },
            pubsub,
            test_otel,
            {
                "class": "modules::queue::QueueModule",
                "config": {"adapter": {"class": "modules::queue::BuiltinQueueAdapter"}},
            },
            {
                "class": "modules::http_functions::HttpFunctionsModule",
                "config": {
                    "security": {
                        "url_allowlist": ["localhost", "127.0.0.1"],
                        "block_private_ips": False,
                        "require_https": False,
                    }
                },
            },
            {
                "class": "modules::cron::CronModule",
                "config": {"adapter": {"class": "modules::cron::KvCronAdapter"}},
            },
        ],
    }

    def small() -> dict[str, Any]:
        in_memory = [stream(reserve_port(), kv("stream", **memory)), state(kv("state", **memory))]
        return {"port": reserve_port(), "modules": [*in_memory, pubsub, quiet_otel]}

    return [test, small(), small()]  # the bridge backend, the bridge


async def call(engine: EngineProcess, function_id: str) -> Any:
    """One call over a fresh worker socket, as any client makes it."""
    from trio_websocket import open_websocket

    from iii.testing import RawWorker

    with trio.fail_after(15):
        async with open_websocket("127.0.0.1", engine.port, "/", use_ssl=False) as ws:
            worker = RawWorker(ws)
            await worker.receive_type("workerregistered")
            reply = await worker.call(function_id, {}, timeout=10)
    assert "error" not in reply, reply
    return reply.get("result")


async def test_three_engines_with_observability_start_side_by_side(tmp_path: Path) -> None:
    engines = []
    try:
        for index, config in enumerate(upstream_sdk_ci_configs()):
            directory = tmp_path / f"engine{index}"
            directory.mkdir()
            engine = EngineProcess.write(directory, config)
            engine.start()
            engines.append(engine)
        for engine in engines:
            await engine.started()
        for engine in engines:
            assert engine.process is not None and engine.process.poll() is None, engine.log_text()
            # The observability module runs in each.
            assert "engine_metrics" in await call(engine, "engine::metrics::list")
        for engine in engines:
            assert engine.terminate() == 0, engine.log_text()
            assert "metrics port on" not in engine.log_text()
    finally:
        for engine in engines:
            engine.kill()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body of one ``GET`` over a fresh socket (``Connection: close``)."""
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            await stream.send_all(request.encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_healthz_and_readyz_on_the_metrics_port_when_asked_for(tmp_path: Path) -> None:
    import orjson

    metrics_port = reserve_port()
    config = {
        "port": reserve_port(),
        "modules": [
            {
                "class": OTEL,
                "config": {"prometheus_enabled": True, "prometheus_port": metrics_port},
            },
        ],
    }
    engine = EngineProcess.write(tmp_path, config)
    engine.start()
    try:
        await engine.started()
        status, body = await http_get(metrics_port, "/healthz")
        assert status == 200 and orjson.loads(body) == {"status": "ok"}
        with trio.fail_after(10):  # ready right after the worker port is bound
            while (answer := await http_get(metrics_port, "/readyz"))[0] != 200:
                await trio.sleep(0.05)
        ready = orjson.loads(answer[1])
        assert ready["status"] == "ready" and ready["worker_port"] == engine.port, ready
        assert (await http_get(metrics_port, "/metrics"))[0] == 200
        assert engine.terminate() == 0
        assert f"metrics port on http://127.0.0.1:{metrics_port}" in engine.log_text()
    finally:
        engine.kill()
