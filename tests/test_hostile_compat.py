"""Compatibility fixes of issue 11, against a real ``python -m iii serve``.

* **A port someone else holds.**  Each listener (the worker port, REST,
  stream, the metrics port) finds its port taken by another process: the
  engine exits 1 with one line that names the address and the config keys
  that set it, in the file the user gave.
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

from tests.support import ROOT, free_port

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
        {"port": free_port(), "modules": modules},
        "config keys modules[0].config.host and modules[0].config.port",
    )


def _stream(port: int) -> tuple[dict[str, Any], str]:
    modules = [
        {"class": REST, "config": {"host": "127.0.0.1", "port": free_port()}},
        {"class": STREAM, "config": {"host": "127.0.0.1", "port": port}},
    ]
    return (
        {"port": free_port(), "modules": modules},
        "config keys modules[1].config.host and modules[1].config.port",
    )


def _metrics(port: int) -> tuple[dict[str, Any], str]:
    modules = [{"class": OTEL, "config": {"prometheus_enabled": True, "prometheus_port": port}}]
    return (
        {"port": free_port(), "modules": modules},
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
