"""A real Motia project runs unchanged under ``python -m iii serve`` (issue 11).

The project is what ``motia`` 1.0.4rc1 (on ``iii-sdk`` 0.9.0, in its own
cached venv: :func:`tests.support.motia_venv`) expects: step files named
``*_step.py`` under ``steps/``, each with a ``config`` and a ``handler``.  Its
``config.yaml`` runs the steps with the exec module, as upstream's playground
does::

    - class: modules::shell::ExecModule
      config:
        watch: [steps/**/*.py]
        exec: [<venv>/bin/motia run --dir steps]

Three steps: ``POST /items`` (HTTP) enqueues ``item.submitted``; a queue step
writes the item into the ``items`` stream; ``GET /items/:id`` (HTTP) reads
it back.  Then: editing a step file changes the answer, ``kill -9`` of the
worker brings it back, and SIGTERM of the engine leaves no process of the
project running.

Motia 1.0.4rc1 runs every handler on the SDK's event loop, where the SDK's
synchronous calls (``enqueue``, ``Stream.get``/``set``) refuse to run
("Cannot call sync SDK methods from the event loop thread"), so the steps
make them through ``asyncio.to_thread``: that is Motia's limitation, not the
engine's.

Motia answers an HTTP step both ways at once: it streams the status, headers
and body on the response channel and returns the same value (README, "What
iii-sdk 0.9.0 sends").  The steps here answer 202 and 404, and every request
goes over one kept-alive connection: the client gets the status the step
means, and the connection survives each answer.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket

from iii.testing import RawWorker
from tests.support import EngineProcess, motia_venv, reserve_port

pytestmark = pytest.mark.sdk

SUBMIT_STEP = """\
import asyncio

from motia import enqueue, http

config = {"name": "Submit", "triggers": [http("POST", "/items")], "enqueues": ["item.submitted"]}


async def handler(args, ctx):
    body = args.request.body or {}
    # Motia 1.0.4rc1 runs handlers on the SDK's event loop, where the SDK's
    # sync calls refuse to run: they go through a thread.
    await asyncio.to_thread(enqueue, {"topic": "item.submitted", "data": body})
    return {"status": 202, "body": {"queued": body["id"]}}
"""

STORE_STEP = """\
import asyncio

from motia import Stream, queue

items = Stream("items")
config = {"name": "Store", "triggers": [queue("item.submitted")]}


async def handler(data, ctx):
    await asyncio.to_thread(items.set, "all", data["id"], {"text": data["text"]})
"""

READ_STEP = """\
import asyncio

from motia import Stream, http

items = Stream("items")
config = {"name": "Read", "triggers": [http("GET", "/items/:id")]}


async def handler(args, ctx):
    item_id = args.request.path_params["id"]
    item = await asyncio.to_thread(items.get, "all", item_id)
    if item is None:
        return {"status": 404, "body": {"missing": item_id, "reader": "v1"}}
    return {"status": 200, "body": {"item": item, "reader": "v1"}}
"""


def write_project(directory: Path, motia_bin: Path) -> tuple[EngineProcess, int]:
    """The project's files and config; the engine to run in it, and its REST port."""
    steps = directory / "steps"
    steps.mkdir(parents=True)
    (steps / "submit_step.py").write_text(SUBMIT_STEP)
    (steps / "store_step.py").write_text(STORE_STEP)
    (steps / "read_step.py").write_text(READ_STEP)
    rest_port, stream_port = reserve_port(), reserve_port()
    config = {
        "modules": [
            {"class": "modules::api::RestApiModule", "config": {"port": rest_port}},
            {"class": "modules::queue::QueueModule"},
            {"class": "modules::stream::StreamModule", "config": {"port": stream_port}},
            {"class": "modules::state::StateModule"},
            {
                "class": "modules::shell::ExecModule",
                "config": {
                    "watch": ["steps/**/*.py"],
                    "exec": [f"{motia_bin}/motia run --dir steps"],
                    "stop_grace_ms": 3000,
                    "restart_backoff_ms": 200,
                },
            },
        ]
    }
    return EngineProcess.write(directory, config), rest_port


def project_processes(directory: Path) -> list[int]:
    """Live processes (not zombies) working in ``directory`` or naming it: the project's."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                text = stat.read()
            if text[text.rfind(b")") + 2 :].split()[0] in (b"Z", b"X"):
                continue
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == str(directory) or str(directory) in command:
            found.append(int(entry))
    return found


async def exec_list(port: int) -> list[dict[str, Any]]:
    async with open_websocket("127.0.0.1", port, "/", use_ssl=False) as ws:
        worker = RawWorker(ws)
        await worker.receive_type("workerregistered")
        reply = await worker.call("engine::exec::list", {}, timeout=10)
    assert "error" not in reply, reply
    pipelines: list[dict[str, Any]] = reply["result"]["pipelines"]
    return pipelines


async def get_json(client: httpx.AsyncClient, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await client.request(kwargs.pop("method", "GET"), path, **kwargs)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


async def until_answer(
    client: httpx.AsyncClient, path: str, expected: Any, timeout: float, status: int = 200
) -> None:
    """GET ``path`` until it answers ``status`` with ``expected``."""
    last: Any = None
    try:
        with trio.fail_after(timeout):
            while (last := await get_json(client, path)) != (status, expected):
                await trio.sleep(0.2)
    except trio.TooSlowError:
        raise AssertionError(f"{path}: last answer {last!r}, expected {expected!r}") from None


async def test_a_motia_project_runs_under_the_engine(tmp_path: Path) -> None:
    motia_bin = await trio.to_thread.run_sync(motia_venv)
    project = tmp_path / "app"
    engine, rest_port = write_project(project, motia_bin)
    engine.start()
    try:
        await engine.started()
        base = f"http://127.0.0.1:{rest_port}"
        # One kept-alive connection for every request: each answer must leave it
        # usable (httpx would open another, counted here, if the engine closed it).
        opened: list[str] = []

        async def count_connections(event_name: str, info: dict[str, Any]) -> None:
            if event_name == "connection.connect_tcp.complete":
                opened.append(event_name)

        async def traced(request: httpx.Request) -> None:
            request.extensions["trace"] = count_connections

        async with httpx.AsyncClient(
            base_url=base,
            timeout=30,
            limits=httpx.Limits(max_connections=1),
            event_hooks={"request": [traced]},
        ) as client:
            # The steps come up: the worker connects and registers the routes.
            await until_answer(client, "/items/none", {"missing": "none", "reader": "v1"}, 60, 404)
            assert len(opened) == 1, opened

            # HTTP step -> enqueue -> queue step -> stream item -> HTTP step.
            status, body = await get_json(
                client, "/items", method="POST", json={"id": "a", "text": "hello"}
            )
            assert (status, body) == (202, {"queued": "a"})
            await until_answer(client, "/items/a", {"item": {"text": "hello"}, "reader": "v1"}, 20)

            # Editing a step file changes the answer within seconds.
            read_step = project / "steps" / "read_step.py"
            read_step.write_text(READ_STEP.replace('"v1"', '"v2"'))
            await until_answer(client, "/items/a", {"item": {"text": "hello"}, "reader": "v2"}, 30)
            (listed,) = await exec_list(engine.port)
            assert listed["name"] == "motia" and listed["state"] == "running"
            assert listed["restarts"] == 1

            # kill -9 of the worker brings it back.
            workers = [
                pid
                for pid in project_processes(project)
                if pid != engine.process.pid  # type: ignore[union-attr]
            ]
            assert listed["pid"] in workers
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            with trio.fail_after(30):
                while (await exec_list(engine.port))[0]["restarts"] < 2:
                    await trio.sleep(0.1)
            await until_answer(client, "/items/a", {"item": {"text": "hello"}, "reader": "v2"}, 30)
            (listed,) = await exec_list(engine.port)
            assert listed["state"] == "running" and listed["pid"] not in workers
            assert listed["last_exit_reason"] == "killed by SIGKILL"
            assert len(opened) == 1, "the engine closed a kept-alive connection"

        # SIGTERM of the engine leaves no process of the project running.
        assert project_processes(project) != []
        code = await trio.to_thread.run_sync(engine.terminate, 30.0)
        assert code == 0, engine.log_text()[-3000:]
        assert project_processes(project) == []
    finally:
        engine.kill()
        for pid in project_processes(project):
            os.kill(pid, signal.SIGKILL)
    log = engine.log_text()
    assert "[motia:stderr]" in log and "Traceback" not in log, log[-3000:]
    # Motia's answers are normal SDK behaviour: the REST module warns about none.
    # (A GET polled while the test restarts or kills the worker may be in flight
    # then: its 500 invocation_stopped is the engine's correct answer, not Motia's.)
    rest_warnings = [
        line
        for line in log.splitlines()
        if "WARNING" in line and "iii.modules.rest_api" in line and "invocation_stopped" not in line
    ]
    assert rest_warnings == [], rest_warnings


def test_the_project_config_passes_check_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support import ROOT

    engine, _ = write_project(tmp_path, Path("/nonexistent/bin"))
    result = subprocess.run(
        [sys.executable, "-m", "iii", "check-config", str(engine.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert textwrap.dedent(result.stdout).strip().endswith(": ok")
