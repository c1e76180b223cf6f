"""Hostile children of the exec module, against a real ``python -m iii serve``.

Each child misbehaves the way a broken or hostile worker can: it floods its
output (with and without line ends), forks grandchildren that ignore SIGTERM
and leave the process group, is restarted by a storm of file changes, or
crashes in a loop.  Each time the engine keeps serving (a raw client calls
``engine::exec::list`` and ``engine::functions::list`` over a real socket),
and SIGTERM stops the engine with status 0 leaving no process behind.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from trio_websocket import open_websocket

from iii.testing import RawWorker
from tests.support import EngineProcess

EXEC = "modules::shell::ExecModule"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def pids_in(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split()] if path.exists() else []


async def call(engine: EngineProcess, function_id: str) -> Any:
    """One call over a fresh socket, as any client would."""
    with trio.fail_after(15):
        async with open_websocket("127.0.0.1", engine.port, "/", use_ssl=False) as ws:
            worker = RawWorker(ws)
            await worker.receive_type("workerregistered")
            reply = await worker.call(function_id, {}, timeout=10)
    assert "error" not in reply, reply
    return reply.get("result")


async def pipelines(engine: EngineProcess) -> list[dict[str, Any]]:
    result = await call(engine, "engine::exec::list")
    listed: list[dict[str, Any]] = result["pipelines"]
    return listed


async def serves(engine: EngineProcess, times: int = 5) -> None:
    for _ in range(times):
        await call(engine, "engine::functions::list")
        await pipelines(engine)


def start(directory: Path, *entries: dict[str, Any]) -> EngineProcess:
    engine = EngineProcess.write(
        directory, {"modules": [{"class": EXEC, "config": e} for e in entries]}
    )
    engine.start()
    return engine


async def stop(engine: EngineProcess) -> None:
    code = await trio.to_thread.run_sync(engine.terminate, 30.0)
    assert code == 0, engine.log_text()[-3000:]


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path


async def test_floods_without_and_with_line_ends(directory: Path) -> None:
    engine = start(
        directory,
        {"exec": ["cat /dev/zero"], "name": "zeros"},
        {"exec": ["exec yes 'a flood of lines'"], "name": "lines"},
        {"exec": ["cat /dev/urandom"], "name": "noise"},
    )
    try:
        await engine.started()
        with trio.fail_after(30):
            while "lines of output dropped" not in engine.log_text():
                await trio.sleep(0.1)
        await serves(engine, 10)
        listed = await pipelines(engine)
        assert [p["state"] for p in listed] == ["running"] * 3
        # What reaches the log is bounded by the line budget, not by the
        # flood: between two reports of dropped lines (at most one a second),
        # far more lines were dropped than logged, however long that took.
        for name in ("lines", "noise"):
            seen = len(drop_reports(engine.log_text(), name))
            with trio.fail_after(30):
                while len(reports := drop_reports(engine.log_text(), name)) < seen + 3:
                    await serves(engine, 1)
            lines = engine.log_text().splitlines()
            (first, _), (_, dropped_1), (last, dropped_2) = reports[seen : seen + 3]
            logged = [
                line
                for line in lines[first:last]
                if f"[{name}] " in line and "lines of output dropped" not in line
            ]
            assert dropped_1 + dropped_2 >= 10 * len(logged), (name, len(logged))
        await stop(engine)
    finally:
        engine.kill()
    log = engine.log_text()
    zeros = [line for line in log.splitlines() if "[zeros] \\x00" in line]
    assert len(zeros) == 1 and zeros[0].endswith("… (line cut)")
    assert max(len(line) for line in log.splitlines()) < 20_000


def drop_reports(log: str, name: str) -> list[tuple[int, int]]:
    """(line index, count) of each report of lines dropped from ``[name]``'s stdout."""
    marker = f"[{name}] "
    reports = []
    for index, line in enumerate(log.splitlines()):
        _, found, rest = line.partition(marker)
        count, _, words = rest.partition(" ")
        if found and count.isdigit() and words.startswith("lines of output dropped"):
            reports.append((index, int(count)))
    return reports


STUBBORN = (
    "trap '' TERM; echo $$ >> pids; "
    "for i in 1 2 3 4 5 6 7 8 9 10; do (trap '' TERM; sleep 600) & echo $! >> pids; done; "
    "setsid sh -c 'trap \"\" TERM; echo $$ >> pids; sleep 600 & echo $! >> pids; wait' & "
    "while :; do sleep 1; done"
)


async def test_grandchildren_that_ignore_sigterm_do_not_outlive_the_engine(directory: Path) -> None:
    engine = start(directory, {"exec": [STUBBORN], "name": "stubborn", "stop_grace_ms": 500})
    try:
        await engine.started()
        with trio.fail_after(30):
            while len(pids := pids_in(directory / "pids")) < 13:
                await trio.sleep(0.05)
        assert all(alive(pid) for pid in pids)
        await serves(engine)
        await stop(engine)
    finally:
        engine.kill()
        survivors = [pid for pid in pids_in(directory / "pids") if alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    assert survivors == []
    assert "SIGKILL" in engine.log_text()


async def test_a_storm_of_file_changes(directory: Path) -> None:
    (directory / "src").mkdir()
    engine = start(
        directory,
        {"exec": ["echo $$ >> pids; exec sleep 600"], "name": "w", "watch": ["src/**/*.py"]},
    )
    try:
        await engine.started()
        with trio.fail_after(30):
            while not pids_in(directory / "pids"):
                await trio.sleep(0.05)
            while "watching ['src/**/*.py']" not in engine.log_text():
                await trio.sleep(0.05)
        # 2,000 writes to 200 files in 20 directories, as fast as they go,
        # while a client keeps calling.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serves, engine, 10)
            for round_ in range(10):
                for index in range(200):
                    sub = directory / "src" / f"d{index % 20}"
                    sub.mkdir(exist_ok=True)
                    (sub / f"f{index}.py").write_text(f"{round_}\n")
                await trio.lowlevel.checkpoint()
        # A last change (one rename: one event, after all the others) is
        # logged, sorted first in its batch, as a restart or as joining the
        # one under way; a worker running after that line is the last one
        # (the listing says "restarting" until the run it asked for starts).
        (directory / "src" / ".settled.tmp").write_text("x")
        (directory / "src" / ".settled.tmp").rename(directory / "src" / "0-settled.py")
        with trio.fail_after(60):
            while "'src/0-settled.py'" not in engine.log_text():
                await trio.sleep(0.1)
            while not (
                (listed := (await pipelines(engine))[0])["state"] == "running"
                and listed["pid"] == pids_in(directory / "pids")[-1]
            ):
                await trio.sleep(0.1)
        assert 1 <= listed["restarts"] <= 21, listed
        assert [pid for pid in pids_in(directory / "pids") if alive(pid)] == [listed["pid"]]
        await stop(engine)
    finally:
        engine.kill()
    assert [pid for pid in pids_in(directory / "pids") if alive(pid)] == []


async def test_a_crash_loop_backs_off_and_never_busy_loops(directory: Path) -> None:
    engine = start(
        directory,
        {
            "exec": ["echo x >> runs; exit 1"],
            "name": "crashy",
            "restart_backoff_ms": 50,
            "restart_backoff_max_ms": 1000,
        },
    )
    try:
        await engine.started()
        with trio.fail_after(60):
            while len(pids_in_lines(directory / "runs")) < 9:
                await serves(engine, 1)
        # Every run after the first waited its logged delay, which doubles
        # from 50 ms and stays at 1 s: never zero, so never a busy loop.
        runs = len(pids_in_lines(directory / "runs"))
        delays = [
            line.rsplit(" ", 1)[1]
            for line in engine.log_text().splitlines()
            if "[crashy] exited 1; restarting in " in line
        ]
        assert delays[:8] == ["0.05s", "0.1s", "0.2s", "0.4s", "0.8s", "1s", "1s", "1s"]
        assert runs <= len(delays) + 1
        listed = (await pipelines(engine))[0]
        assert listed["state"] in ("crash-loop", "running", "starting")
        assert listed["last_exit"] == 1
        await stop(engine)
    finally:
        engine.kill()
    assert engine.log_text().count("[crashy] crash loop:") == 1


def pids_in_lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []
