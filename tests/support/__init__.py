"""Shared helpers for the integration tests: official SDK workers, engine processes,
and the real services (Redis, RabbitMQ).

* :func:`sdk_python` returns the interpreter of a cached virtual environment
  with ``iii-sdk==<version>`` installed (created once under ``.cache/``; the
  0.4.1, 0.9.0 and 0.25.0 SDKs conflict, so each has its own).
* :func:`motia_venv` returns the ``bin`` directory of a cached virtual
  environment with Motia (``motia==1.0.4rc1`` on ``iii-sdk==0.9.0``).
* :func:`start_sdk_worker` runs a worker script with that interpreter as a
  child process of the test and exposes its stdout line by line.
* :class:`EngineProcess` runs ``python -m iii serve`` as a real process, for
  tests that kill and restart the engine.
* :func:`require_redis` / :func:`require_rabbitmq` skip when the service is
  absent, except under ``III_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import venv
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

__all__ = [
    "ROOT",
    "sdk_python",
    "motia_venv",
    "start_sdk_worker",
    "SdkWorker",
    "EngineProcess",
    "running_engine",
    "reserve_port",
    "release_ports",
    "free_port",
    "require_redis",
    "require_rabbitmq",
    "services_required",
    "SERVICE_KINDS",
    "backend_params",
    "wait_for_port",
    "node_sdk_dir",
    "start_node_worker",
]

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("III_TEST_CACHE", ROOT / ".cache"))
SDK_VERSIONS = ("0.4.1", "0.9.0", "0.25.0")


def services_required() -> bool:
    return os.environ.get("III_REQUIRE_SERVICES") == "1"


# Backend kinds that need a service running on 127.0.0.1 (Redis, RabbitMQ).
SERVICE_KINDS = frozenset({"redis", "rabbitmq"})


def backend_params(*kinds: str) -> list[Any]:
    """``kinds`` as parameters, each service kind carrying ``pytest.mark.services``.

    The mark is on the parameter itself, so ``-m "not services"`` deselects the
    case at collection (a mark added from inside a fixture does not).
    """
    return [
        pytest.param(kind, marks=pytest.mark.services, id=kind) if kind in SERVICE_KINDS else kind
        for kind in kinds
    ]


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_RUNNING: list[pytest.Item] = []


@contextmanager
def running_test(item: pytest.Item) -> Iterator[None]:
    """While ``item`` runs (``tests/conftest.py``): :func:`_require` checks its mark."""
    _RUNNING.append(item)
    try:
        yield
    finally:
        _RUNNING.remove(item)


def _require(name: str, port: int) -> None:
    if _RUNNING and _RUNNING[-1].get_closest_marker("services") is None:
        pytest.fail(
            f"{_RUNNING[-1].nodeid} uses {name} without the `services` mark "
            "(pytest.param(..., marks=pytest.mark.services), tests.support.backend_params, "
            "or a module or class mark)"
        )
    if _port_open("127.0.0.1", port):
        return
    message = f"{name} is not running on 127.0.0.1:{port}"
    if services_required():
        pytest.fail(message + " (III_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def require_redis() -> str:
    _require("Redis", 6379)
    return "redis://127.0.0.1:6379"


def require_rabbitmq() -> str:
    _require("RabbitMQ", 5672)
    return "amqp://guest:guest@127.0.0.1:5672/"


_RESERVED: list[socket.socket] = []


def reserve_port() -> int:
    """A TCP port that nothing else on this machine can take until the test ends.

    The port is bound here (port 0, every address, ``SO_REUSEADDR``) and the
    socket is held, not listening, until :func:`release_ports` (after each
    test, ``tests/conftest.py``; a benchmark at exit).  On Linux a listener
    that also sets ``SO_REUSEADDR`` (trio's, Redis's) may still bind it and
    listen, while any other bind, and the ephemeral port of any outgoing
    connection, is refused it; so a server child started with this port gets
    it, even when restarted.  Until something listens, a connection to it is
    refused, which makes it a closed port too.  (Picking a free port and
    releasing it before use, as before, let anything take it meanwhile.)
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", 0))
    except BaseException:
        sock.close()
        raise
    _RESERVED.append(sock)
    return int(sock.getsockname()[1])


# The old name, for tests written against it (branches in flight): the same
# reservation, nothing is picked and released any more.  New code: reserve_port.
free_port = reserve_port


def release_ports() -> None:
    """Give back every port :func:`reserve_port` holds."""
    while _RESERVED:
        _RESERVED.pop().close()


async def wait_for_port(port: int, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


# -- SDK virtual environments ------------------------------------------------------


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


MOTIA_VERSION = "1.0.4rc1"
MOTIA_SDK_VERSION = "0.9.0"


def motia_venv() -> Path:
    """The ``bin`` directory of a venv with ``motia`` and its ``iii-sdk``; built once, locked."""
    return (
        _cached_venv(
            CACHE / "motia-venvs" / f"motia-{MOTIA_VERSION}",
            [f"motia=={MOTIA_VERSION}", f"iii-sdk=={MOTIA_SDK_VERSION}"],
        )
        / "bin"
    )


def _cached_venv(target: Path, requirements: list[str]) -> Path:
    """A venv at ``target`` with ``requirements`` installed, once, under a file lock."""
    marker = target / ".installed"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".lock-{target.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(target)
            result = subprocess.run(
                [str(target / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"installing {requirements} failed:\n{result.stderr[-2000:]}")
            marker.write_text(" ".join(requirements))
    return target


# Prepended to every Python worker script.  ``print`` writes its text and its
# line end in two calls, so a line printed by one thread (the script's command
# loop) can be split by another thread's output (the 0.25 SDK runs handlers
# and logs from its own threads): "OK" + "LOG ..." + "\n".  One write per
# line keeps the lines whole, as the tests read them line by line.
_LINE_ATOMIC_PRINT = """\
import builtins as _builtins, sys as _sys
def _print_line(*args, sep=" ", end="\\n", file=None, flush=False):
    stream = _sys.stdout if file is None else file
    stream.write(sep.join(map(str, args)) + end)
    if flush:
        stream.flush()
_builtins.print = _print_line
"""


@attrs.define(eq=False)
class SdkWorker:
    """An SDK worker process; its stdout is read line by line."""

    process: trio.Process
    lines: trio.MemoryReceiveChannel[str]
    seen: list[str] = attrs.field(factory=list)

    async def wait_for(self, prefix: str, timeout: float = 20.0, *, contains: str = "") -> str:
        """The first stdout line (seen before or arriving) starting with ``prefix``
        and containing ``contains``; other lines are kept for later."""
        for line in self.seen:
            if line.startswith(prefix) and contains in line:
                self.seen.remove(line)
                return line
        with trio.fail_after(timeout):
            async for line in self.lines:
                if line.startswith(prefix) and contains in line:
                    return line
                self.seen.append(line)
        raise AssertionError(f"worker exited before printing {prefix!r}; output: {self.seen}")

    async def request(
        self, line: str, *, timeout: float = 30.0, on_line: Callable[[str], None] | None = None
    ) -> tuple[str, str]:
        """Send one command line and wait for its reply line, ``OK <rest>`` or
        ``ERR <rest>``; returns ``(status, rest)``.  Other lines on the way go
        to ``on_line`` (default: kept in ``seen`` for :meth:`wait_for`)."""
        await self.send_line(line)
        keep = on_line or self.seen.append
        with trio.fail_after(timeout):
            async for out in self.lines:
                status, _, rest = out.partition(" ")
                if status in ("OK", "ERR"):
                    return status, rest
                keep(out)
        raise AssertionError(f"worker exited before answering {line!r}; output: {self.seen}")

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def send_line(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")


@asynccontextmanager
async def _run_worker_process(
    argv: list[str], *, env: dict[str, str] | None, script: Path
) -> AsyncIterator[SdkWorker]:
    """Run a worker script as a child process; its stdout arrives line by line.

    The process and the stdout pump live in a nursery of this block; leaving it
    kills the process and removes ``script``.
    """
    send, receive = trio.open_memory_channel[str](1000)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            lambda task_status: trio.run_process(  # noqa: ASYNC105 (awaited by start)
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                env=env,
                check=False,
                task_status=task_status,
            )
        )

        async def pump() -> None:
            buffer = b""
            async with send:
                assert process.stdout is not None
                async for chunk in process.stdout:
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        await send.send(line.decode(errors="replace"))

        nursery.start_soon(pump)
        worker = SdkWorker(process, receive)
        try:
            yield worker
        finally:
            worker.kill()
            nursery.cancel_scope.cancel()
            script.unlink(missing_ok=True)


@asynccontextmanager
async def start_sdk_worker(
    version: str,
    script: str,
    *,
    url: str,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> AsyncIterator[SdkWorker]:
    """Run ``script`` (Python source) under SDK ``version`` with ``III_URL=url``.

    The script reads the engine URL from ``sys.argv[1]``.  The process is
    killed when the block exits.
    """
    python = await trio.to_thread.run_sync(sdk_python, version)
    script_path = CACHE / "worker-scripts"
    script_path.mkdir(parents=True, exist_ok=True)
    file = script_path / f"w{os.getpid()}_{id(script)}_{trio.current_time():.0f}.py"
    source = textwrap.dedent(script)
    assert "from __future__" not in source, "worker scripts get a preamble: no __future__ imports"
    file.write_text(_LINE_ATOMIC_PRINT + source)
    child_env = {**os.environ, "III_URL": url, "PYTHONUNBUFFERED": "1", "OTEL_ENABLED": "false"}
    child_env.pop("PYTHONPATH", None)
    child_env.update(env or {})
    argv = [str(python), str(file), url, *args]
    async with _run_worker_process(argv, env=child_env, script=file) as worker:
        yield worker


def node_sdk_dir() -> Path:
    """A directory with ``npm install iii-sdk`` done once; skips without Node."""
    import shutil

    if shutil.which("node") is None or shutil.which("npm") is None:
        message = "Node.js and npm are not installed (the Node SDK tests need them)"
        if services_required():  # CI runs everything: a missing tool is a failure there
            pytest.fail(message + " (III_REQUIRE_SERVICES=1)")
        pytest.skip(message)
    target = CACHE / "node-sdk"
    marker = target / ".installed"
    if marker.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock-node", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            result = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "iii-sdk"],
                cwd=target,
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"npm install iii-sdk failed:\n{result.stderr[-2000:]}")
            marker.write_text("ok")
    return target


@asynccontextmanager
async def start_node_worker(
    script: str, *, url: str, args: tuple[str, ...] = ()
) -> AsyncIterator[SdkWorker]:
    """Run an ES-module ``script`` with the Node SDK installed beside it."""
    directory = await trio.to_thread.run_sync(node_sdk_dir)
    file = directory / f"w{os.getpid()}_{id(script)}.mjs"
    file.write_text(textwrap.dedent(script))
    argv = ["node", str(file), url, *args]
    async with _run_worker_process(argv, env=None, script=file) as worker:
        yield worker


@attrs.define(eq=False)
class EngineProcess:
    """``python -m iii serve -c <config>`` as a real child process."""

    config_path: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "iii", "serve", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )

    async def started(self, timeout: float = 20.0) -> None:
        await wait_for_port(self.port, timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @classmethod
    def write(
        cls, directory: Path, config: dict[str, Any], name: str = "config.yaml"
    ) -> EngineProcess:
        import yaml

        port = config.setdefault("port", reserve_port())
        path = directory / name
        path.write_text(yaml.safe_dump(config))
        return cls(config_path=path, port=port, log_path=directory / f"{path.stem}.log")


@asynccontextmanager
async def running_engine(directory: Path, config: dict[str, Any]) -> AsyncIterator[EngineProcess]:
    """``python -m iii serve`` with ``config`` (written under ``directory``), killed on exit."""
    engine = EngineProcess.write(directory, config)
    engine.start()
    try:
        await engine.started()
        yield engine
    finally:
        engine.kill()
