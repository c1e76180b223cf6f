"""What the benchmarks share: ports, and the SDK virtual environments.

Not the test suite's helpers (``tests.support`` needs pytest, which the
``bench`` extra does not install): a benchmark imports only the engine, its
dependencies and the ``bench`` extra.  :func:`sdk_python` builds the same
cached virtual environments as ``tests.support.sdk_python`` (same place,
same lock), so tests and benchmarks share them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

import attrs
import trio
import yaml

__all__ = [
    "ROOT",
    "CACHE",
    "free_port",
    "reserve_port",
    "wait_port",
    "wait_for_port",
    "sdk_python",
    "EngineProcess",
]

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("III_TEST_CACHE", ROOT / ".cache"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_RESERVED: list[socket.socket] = []


def reserve_port() -> int:
    """A port held (bound, not listening) until this process exits.

    As ``tests.support.reserve_port``: with ``SO_REUSEADDR`` a server child
    that also sets it (trio's listener does) can still bind and listen on
    it, while nothing else takes it meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", 0))
    _RESERVED.append(sock)
    return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


async def wait_for_port(port: int, within: float = 30) -> None:
    """:func:`wait_port` for a trio caller."""
    with trio.fail_after(within):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


def sdk_python(version: str) -> Path:
    """The python of a venv with ``iii-sdk==version``; built once, under a file lock."""
    target = CACHE / "sdk-venvs" / f"iii-sdk-{version}"
    python = target / "bin" / "python"
    marker = target / ".installed"
    if marker.exists():
        return python
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".lock-{version}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            print(f"installing iii-sdk=={version} into {target} (once)", flush=True)
            venv.EnvBuilder(with_pip=True, clear=True).create(target)
            result = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", f"iii-sdk=={version}"],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"installing iii-sdk=={version} failed:\n{result.stderr[-2000:]}"
                )
            marker.write_text(version)
    return python


@attrs.define
class EngineProcess:
    """``python -m iii serve -c <config>`` as a child process (as the tests' own)."""

    config_path: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def write(
        cls, directory: Path, config: dict[str, Any], name: str = "config.yaml"
    ) -> EngineProcess:
        port = config.setdefault("port", reserve_port())
        path = directory / name
        path.write_text(yaml.safe_dump(config))
        return cls(config_path=path, port=port, log_path=directory / f"{path.stem}.log")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "iii", "serve", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )

    async def started(self, within: float = 20.0) -> None:
        await wait_for_port(self.port, within)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
