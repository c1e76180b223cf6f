"""``python -m iii serve --processes N``: the supervisor, its children, the shared ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import yaml
from trio_websocket import ConnectionClosed, open_websocket

from iii.testing import RawWorker
from tests.cluster.helpers import TOKEN, TOKEN_ENV
from tests.cluster.processes import engine_config
from tests.support import ROOT, wait_for_port
from tests.support.cli import run_cli

pytestmark = [pytest.mark.services]


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (by the parent pid in /proc/*/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


@attrs.define
class Tree:
    """A ``serve`` supervisor started by :func:`supervisor_tree`."""

    process: subprocess.Popen[str]
    notifications: trio.socket.SocketType  # the NOTIFY_SOCKET it was given
    config_path: Path

    async def wait_notified(self, field: bytes, timeout: float) -> None:
        with trio.fail_after(timeout):
            while field not in await self.notifications.recv(4096):
                pass


@asynccontextmanager
async def supervisor_tree(
    tmp_path: Path, config: dict[str, Any], *, env: dict[str, str] | None = None, stderr: int
) -> AsyncIterator[Tree]:
    """``python -m iii serve`` on ``config`` with a datagram socket standing in
    for systemd's NOTIFY_SOCKET; killed on exit if still running."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    notify_path = str(tmp_path / "notify.sock")
    receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await receiver.bind(notify_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "iii", "serve", "-c", str(path)],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            TOKEN_ENV: TOKEN,
            "NOTIFY_SOCKET": notify_path,
            **(env or {}),
        },
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )
    try:
        yield Tree(process, receiver, path)
    finally:
        receiver.close()
        if process.poll() is None:
            process.kill()
            process.wait()


async def answer_http(worker: RawWorker) -> None:
    try:
        while True:
            message = await worker.receive_type("invokefunction", timeout=3600)
            await worker.send(
                {
                    "type": "invocationresult",
                    "invocation_id": message["invocation_id"],
                    "function_id": message["function_id"],
                    "result": {"status_code": 200, "body": {"ok": True}},
                }
            )
    except ConnectionClosed:
        return  # its engine process was the one killed


async def test_processes_without_a_cluster_or_with_memory_adapters_is_a_config_error(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("modules: []\n")
    result = await run_cli("serve", "-c", str(plain), "--processes", "2")
    assert result.code == 2
    assert "processes" in result.stderr and "cluster" in result.stderr
    plain.write_text("processes: 2\nmodules: []\n")
    checked = await run_cli("check-config", str(plain))
    assert checked.code == 2  # check-config catches what serve catches
    assert "processes" in checked.stderr and "cluster" in checked.stderr
    config = engine_config("x", "p:")
    config["modules"].append({"class": "modules::state::StateModule", "config": {}})
    config["modules"] = [
        m for m in config["modules"] if "State" not in m["class"] or m["config"] == {}
    ]
    memory = tmp_path / "memory.yaml"
    memory.write_text(yaml.safe_dump({**config, "processes": 2}))
    result = await run_cli("serve", "-c", str(memory), env={TOKEN_ENV: TOKEN})
    assert result.code == 2
    assert "state" in result.stderr and "adapter" in result.stderr, result.stderr
    bad = await run_cli("serve", "-c", str(plain), "--processes", "many")
    assert bad.code == 2


async def test_two_processes_share_the_ports_restart_a_killed_child_and_stop_on_sigterm(
    tmp_path: Path,
) -> None:
    config = engine_config(f"sup-{uuid.uuid4().hex[:6]}", f"iiitest:{uuid.uuid4().hex[:8]}:")
    config["processes"] = 2
    rest_port = config["modules"][0]["config"]["port"]
    async with supervisor_tree(
        tmp_path,
        config,
        env={"WATCHDOG_USEC": "2000000"},  # systemd's WatchdogSec=2
        stderr=subprocess.DEVNULL,
    ) as tree:
        supervisor = tree.process
        # READY=1 only once both children are ready; then the supervisor
        # keeps systemd's watchdog (WATCHDOG=1 every half of it).
        await tree.wait_notified(b"READY=1", 90)
        await tree.wait_notified(b"WATCHDOG=1", 30)
        first = sorted(children_of(supervisor.pid))
        assert len(first) == 2
        async with (
            open_websocket("127.0.0.1", config["port"], "/", use_ssl=False) as ws,
            trio.open_nursery() as nursery,
        ):
            worker = RawWorker(ws)
            await worker.receive_type("workerregistered")
            await worker.send({"type": "registerfunction", "id": "sup::hello"})
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": str(uuid.uuid4()),
                    "trigger_type": "http",
                    "function_id": "sup::hello",
                    "config": {"api_path": "/sup/hello", "http_method": "GET"},
                }
            )
            nursery.start_soon(answer_http, worker)
            # Every request is answered whichever process the kernel hands it to.
            async with httpx.AsyncClient() as client:
                with trio.fail_after(60):
                    while True:
                        statuses = [
                            (
                                await client.get(
                                    f"http://127.0.0.1:{rest_port}/sup/hello",
                                    headers={"connection": "close"},
                                )
                            ).status_code
                            for _ in range(12)
                        ]
                        if statuses == [200] * 12:
                            break
                        await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        # kill -9 one child: the supervisor starts another.
        os.kill(first[0], signal.SIGKILL)
        with trio.fail_after(60):
            while True:
                now = children_of(supervisor.pid)
                if len(now) == 2 and first[0] not in now:
                    break
                await trio.sleep(0.1)
        await wait_for_port(config["port"])
        supervisor.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(supervisor.wait, 60)
        assert code == 0
        assert children_of(supervisor.pid) == []


async def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    config = engine_config(f"sup-{uuid.uuid4().hex[:6]}", f"iiitest:{uuid.uuid4().hex[:8]}:")
    config["processes"] = 2
    config["shutdown_grace_ms"] = 200
    children: list[int] = []
    try:
        async with supervisor_tree(tmp_path, config, stderr=subprocess.DEVNULL) as tree:
            await tree.wait_notified(b"READY=1", 90)
            children = children_of(tree.process.pid)
            assert len(children) == 2
            tree.process.kill()  # SIGKILL: it cannot stop them itself
            tree.process.wait()
            with trio.fail_after(30):
                while any(alive(pid) for pid in children):
                    await trio.sleep(0.1)
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_file_store_under_several_processes_is_a_config_error(tmp_path: Path) -> None:
    # Every process would open the same store directory.
    config = engine_config(f"sup-{uuid.uuid4().hex[:6]}", f"iiitest:{uuid.uuid4().hex[:8]}:")
    config["processes"] = 2
    config["modules"].append(
        {
            "class": "modules::kv_server::KvServer",
            "config": {"store_method": "file_based", "file_path": str(tmp_path / "kv")},
        }
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    index = len(config["modules"]) - 1
    for command in (["check-config", str(path)], ["serve", "-c", str(path)]):
        result = await run_cli(*command, env={TOKEN_ENV: TOKEN})
        assert result.code == 2, result.stderr
        assert f"modules[{index}].config.store_method" in result.stderr, result.stderr
        assert str(path) in result.stderr


async def test_a_child_config_error_stops_the_tree_with_exit_2(tmp_path: Path) -> None:
    # The config file is made invalid while the tree runs; a child killed
    # afterwards restarts, reads it, and exits 2.  A restart cannot fix that,
    # so the supervisor stops the other child and exits 2 itself (no loop).
    config = engine_config(f"sup-{uuid.uuid4().hex[:6]}", f"iiitest:{uuid.uuid4().hex[:8]}:")
    config["processes"] = 2
    config["shutdown_grace_ms"] = 200
    async with supervisor_tree(tmp_path, config, stderr=subprocess.PIPE) as tree:
        supervisor = tree.process
        await tree.wait_notified(b"READY=1", 90)
        first = children_of(supervisor.pid)
        assert len(first) == 2
        tree.config_path.write_text(yaml.safe_dump({**config, "port": "not a port"}))
        os.kill(first[0], signal.SIGKILL)
        _, stderr = await trio.to_thread.run_sync(supervisor.communicate, None, 90)
        assert supervisor.returncode == 2, stderr
        assert "config error" in stderr and "port" in stderr
        assert "(a config error): not restarted" in stderr
        assert stderr.count("restarting in") == 1  # the kill, then no loop
        assert children_of(supervisor.pid) == []
        assert not any(alive(pid) for pid in first)
