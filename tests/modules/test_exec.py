"""The exec module (``modules::shell::ExecModule``) in an engine in the test's nursery.

Real processes (``sh -c``), a real file watcher, the engine log read through
``caplog``.  Each test runs in its own directory (the pipelines' working
directory is the engine's).  Waits are bounded with ``trio.fail_after``;
nothing asserts on how long something took.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from iii.config import parse_config
from iii.engine import Engine
from iii.errors import ConfigError
from iii.modules.exec import name_instances
from iii.modules.exec.globs import WatchPatterns, check_pattern
from iii.modules.exec.process import MAX_LINE_BYTES, LineBudget
from iii.testing import make_config, open_test_engine
from tests.support import ROOT

EXEC = "modules::shell::ExecModule"


def exec_entry(**config: Any) -> dict[str, Any]:
    return {"class": EXEC, "config": config}


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's own directory as the engine's working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def exec_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    caplog.set_level(logging.INFO, logger="iii.exec")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "iii.exec"]


async def wait_until(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    with trio.fail_after(timeout):
        while not (value := predicate()):
            await trio.sleep(0.02)
    return value


async def pipelines(engine: Engine) -> list[dict[str, Any]]:
    result = await engine.invoke("engine::exec::list", {})
    listed: list[dict[str, Any]] = result["pipelines"]
    return listed


async def pipeline(engine: Engine, index: int = 0) -> dict[str, Any]:
    return (await pipelines(engine))[index]


@asynccontextmanager
async def exec_engine(*entries: dict[str, Any]) -> AsyncIterator[Engine]:
    async with open_test_engine(make_config(list(entries))) as engine:
        yield engine


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "modules[0].config.exec: required key is missing"),
        ({"exec": []}, "exec: must list at least one command"),
        ({"exec": ["  "]}, "exec[0]: an empty command"),
        ({"exec": "motia run"}, "expected a list of strings"),
        ({"exec": ["a"], "watch": ["steps/**.py"]}, "write it as a whole segment"),
        ({"exec": ["a"], "watch": ["/etc/*.conf"]}, "an absolute path"),
        ({"exec": ["a"], "watch": ["../up/*.py"]}, "'..' segment"),
        ({"exec": ["a"], "watch": ["steps/*.{ts,js"]}, "an unclosed '{'"),
        ({"exec": ["a"], "watch": [""]}, "an empty pattern"),
        ({"exec": ["a"], "wacth": ["x"]}, "unknown key: wacth"),
        ({"exec": ["a"], "stop_grace_ms": True}, "expected an integer, got a boolean"),
        ({"exec": ["a"], "restart_backoff_ms": 0}, "restart_backoff_ms: must be at least 1"),
        (
            {"exec": ["a"], "restart_backoff_ms": 500, "restart_backoff_max_ms": 100},
            "restart_backoff_max_ms: must be at least restart_backoff_ms",
        ),
        ({"exec": ["a"], "name": "a b"}, "name: 'a b'"),
    ],
)
def test_config_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="modules\\[0\\]") as error:
        parse_config({"modules": [exec_entry(**config)]}, file="config.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("config.yaml: ")


@pytest.mark.parametrize(
    "config",
    [{"exec": []}, {"exec": ["a"], "watch": ["steps/**.py"]}, {"exec": ["a"], "bogus": 1}],
)
def test_check_config_exits_2(tmp_path: Path, config: dict[str, Any]) -> None:
    import yaml

    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump({"modules": [exec_entry(**config)]}))
    result = subprocess.run(
        [sys.executable, "-m", "iii", "check-config", str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2, result.stderr
    assert "modules[0].config" in result.stderr


def test_upstream_shapes_load() -> None:
    """Upstream's playground block, and ``watch: null``."""
    config = parse_config(
        {
            "modules": [
                exec_entry(watch=["steps/**/*.py"], exec=["motia run --dir steps"]),
                exec_entry(watch=None, exec=["npm run build", "node server.js"]),
            ]
        }
    )
    names = [entry.config.name for entry in config.modules if entry.class_name == EXEC]
    assert names == ["motia", "node"]


def test_listed_several_times_each_named_uniquely() -> None:
    config = parse_config(
        {
            "modules": [
                exec_entry(exec=["node a.js"]),
                exec_entry(exec=["node b.js"]),
                exec_entry(exec=["FOO=1 exec ./bin/node c.js"]),
                exec_entry(exec=["python w.py"], name="node-5"),
            ]
        }
    )
    assert [e.config.name for e in config.modules if e.class_name == EXEC] == [
        "node",
        "node-2",
        "node-3",
        "node-5",
    ]
    with pytest.raises(ConfigError, match=r"modules\[1\]\.config\.name: two exec pipelines"):
        parse_config(
            {"modules": [exec_entry(exec=["a"], name="w"), exec_entry(exec=["b"], name="w")]}
        )
    # The rule stays for every other module.
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config({"modules": [{"class": "modules::cron::CronModule"}] * 2})


def test_name_instances_keeps_explicit_names_first() -> None:
    configs = parse_config(
        {"modules": [exec_entry(exec=["w"]), exec_entry(exec=["x"], name="w")]}
    ).modules
    named = name_instances([m.config for m in configs[:2]], file=None, keys=["a", "b"])
    assert [c.name for c in named] == ["w-2", "w"]


# -- globs -----------------------------------------------------------------------------------


def test_watch_patterns_match_and_roots(tmp_path: Path) -> None:
    (tmp_path / "steps" / "deep").mkdir(parents=True)
    patterns = WatchPatterns(tmp_path, ("steps/**/*.py", "config/*.{json,yaml}", "main.py"))
    assert patterns.matches(tmp_path / "steps" / "a.py")
    assert patterns.matches("steps/deep/er/a.py")
    assert not patterns.matches("steps/a.pyc")
    assert not patterns.matches("steps/.a.py")  # an editor's hidden file
    assert patterns.matches("config/x.yaml") and not patterns.matches("config/x.toml")
    assert patterns.matches("main.py") and not patterns.matches("sub/main.py")
    assert not patterns.matches("/elsewhere/steps/a.py")
    roots = {root.path: root.recursive for root in patterns.roots()}
    # config/ does not exist yet: its nearest existing ancestor, recursively.
    assert roots == {tmp_path: True}
    only_steps = WatchPatterns(tmp_path, ("steps/**/*.py", "steps/deep/*.py"))
    assert [(r.path, r.recursive) for r in only_steps.roots()] == [(tmp_path / "steps", True)]
    assert check_pattern("steps/**/*.py") is None
    assert check_pattern(r"steps/\[x.py") is None


# -- output ----------------------------------------------------------------------------------


def test_line_budget() -> None:
    budget = LineBudget(rate=10.0, burst=3)
    assert [budget.take(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert budget.dropped == 2
    assert budget.take(0.1)  # one line's worth refilled
    assert not budget.take(0.1)


# -- running ---------------------------------------------------------------------------------


async def test_build_steps_then_worker_in_the_working_directory(
    project: Path, exec_log: Callable[[], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FROM_ENGINE", "kept")
    monkeypatch.setenv("III_BRIDGE_URL", "ws://preset:1")
    entry = exec_entry(
        exec=[
            "echo built > built.txt",
            'cat built.txt; echo "url=$III_URL bridge=$III_BRIDGE_URL env=$FROM_ENGINE"; '
            "echo $$ > worker.pid; exec sleep 600",
        ],
        name="app",
    )
    async with exec_engine(entry) as engine:
        await wait_until(lambda: (project / "worker.pid").exists())
        # The child's own line (the "starting:" line quotes the command, "env=" included).
        await wait_until(lambda: any(line.startswith("[app] url=") for line in exec_log()))
        lines = exec_log()
        assert "[app] built" in lines
        url = f"ws://127.0.0.1:{engine.listen_port}"
        assert f"[app] url={url} bridge=ws://preset:1 env=kept" in lines
        listed = await pipeline(engine)
        worker_pid = pids_in(project / "worker.pid")[0]
        assert listed["name"] == "app" and listed["state"] == "running"
        assert listed["pid"] == worker_pid and alive(worker_pid)
        assert listed["command"] == entry["config"]["exec"][1]
        assert listed["exec"] == entry["config"]["exec"]
        assert listed["restarts"] == 0 and listed["last_exit"] == 0  # the build step's
        assert listed["seconds_since_start"] >= 0
    assert not alive(worker_pid)


async def test_a_failed_build_step_stops_the_pipeline(
    project: Path, exec_log: Callable[[], list[str]]
) -> None:
    entry = exec_entry(
        exec=["echo step1 >> ran; exit 3", "echo worker >> ran; exec sleep 600"],
        name="b",
        restart_backoff_ms=60_000,
        restart_backoff_max_ms=60_000,
    )
    async with exec_engine(entry) as engine:
        await wait_until(lambda: any("build step" in line for line in exec_log()))
        listed = await pipeline(engine)
        assert listed["state"] == "backoff" and listed["last_exit"] == 3
        assert listed["last_exit_reason"] == "exited 3" and listed["pid"] is None
    assert (project / "ran").read_text() == "step1\n"
    assert (
        "[b] build step 'echo step1 >> ran; exit 3' exited 3: the pipeline stops here" in exec_log()
    )


async def test_unexpected_exit_restarts_with_backoff_and_a_crash_loop_is_logged(
    project: Path, exec_log: Callable[[], list[str]]
) -> None:
    entry = exec_entry(
        exec=["echo run >> runs; exit 7"],
        name="crashy",
        restart_backoff_ms=20,
        restart_backoff_max_ms=160,
    )
    async with exec_engine(entry) as engine:
        await wait_until(lambda: len(pids_in_lines(project / "runs")) >= 7)
        listed = await pipeline(engine)
        assert listed["last_exit"] == 7 and listed["restarts"] >= 6
    delays = [
        float(line.rsplit(" ", 1)[1].rstrip("s"))
        for line in exec_log()
        if line.startswith("[crashy] exited 7; restarting in ")
    ]
    # Doubling from the first delay up to the cap, then staying there.
    assert delays[:6] == [0.02, 0.04, 0.08, 0.16, 0.16, 0.16]
    crash_loops = [line for line in exec_log() if "crash loop" in line]
    assert len(crash_loops) == 1, crash_loops  # logged once, then it keeps backing off
    assert crash_loops[0].startswith("[crashy] crash loop: 5 failures in 60s")


def pids_in_lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_a_stable_run_starts_the_backoff_over(
    project: Path, exec_log: Callable[[], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from iii.modules.exec import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "STABLE_AFTER", 0.3)
    # Quick failures twice, then a run that lasts, then quick again.
    script = 'echo run >> runs; if [ "$(wc -l < runs)" -eq 3 ]; then sleep 0.6; fi; exit 1'
    entry = exec_entry(
        exec=[script], name="s", restart_backoff_ms=10, restart_backoff_max_ms=10_000
    )
    async with exec_engine(entry):
        await wait_until(lambda: len(pids_in_lines(project / "runs")) >= 5)
    delays = [line.rsplit(" ", 1)[1] for line in exec_log() if "restarting in" in line]
    assert delays[:4] == ["0.01s", "0.02s", "0.01s", "0.02s"]


async def test_a_killed_worker_comes_back(project: Path, exec_log: Callable[[], list[str]]) -> None:
    entry = exec_entry(exec=["echo $$ >> pids; exec sleep 600"], name="k", restart_backoff_ms=10)
    async with exec_engine(entry) as engine:
        first = (await wait_until(lambda: pids_in(project / "pids")))[0]
        os.kill(first, signal.SIGKILL)
        pids = await wait_until(
            lambda: len(pids_in(project / "pids")) == 2 and pids_in(project / "pids")
        )
        second = pids[1]
        listed = await pipeline(engine)
        with trio.fail_after(10):
            while listed["pid"] != second:
                await trio.sleep(0.02)
                listed = await pipeline(engine)
        assert listed["state"] == "running" and listed["restarts"] == 1
        assert listed["last_exit"] == -signal.SIGKILL
        assert listed["last_exit_reason"] == "killed by SIGKILL"
        assert alive(second) and not alive(first)
    assert not alive(second)


# A worker that ignores SIGTERM and leaves processes behind in every way a
# program can: a child in its group that ignores SIGTERM too, a grandchild
# that left the group (setsid) and a child of that one; each writes its pid.
STUBBORN = (
    "trap '' TERM; echo $$ >> pids; "
    "(trap '' TERM; echo $(exec sh -c 'echo $PPID') >> pids; exec sleep 600) & "
    "setsid sh -c 'trap \"\" TERM; echo $$ >> pids; sleep 600 & echo $! >> pids; wait' & "
    "while :; do sleep 1; done"
)


async def test_stop_leaves_no_process_even_those_ignoring_sigterm(
    project: Path, exec_log: Callable[[], list[str]]
) -> None:
    entry = exec_entry(exec=[STUBBORN], name="stubborn", stop_grace_ms=200)
    async with exec_engine(entry):
        pids = await wait_until(
            lambda: len(pids_in(project / "pids")) >= 4 and pids_in(project / "pids")
        )
        assert all(alive(pid) for pid in pids)
        # The setsid'd one really left the worker's process group.
        assert len({os.getpgid(pid) for pid in pids}) == 2
    assert [pid for pid in pids if alive(pid)] == []
    assert any("still running 0.2s after SIGTERM: SIGKILL" in line for line in exec_log())


async def test_a_restart_stops_the_whole_tree_first(project: Path) -> None:
    (project / "src").mkdir()
    entry = exec_entry(exec=[STUBBORN], name="stubborn", stop_grace_ms=200, watch=["src/*.py"])
    async with exec_engine(entry) as engine:
        first = await wait_until(
            lambda: len(pids_in(project / "pids")) >= 4 and pids_in(project / "pids")
        )
        await wait_for_watcher(engine)
        (project / "pids").unlink()
        (project / "src" / "a.py").write_text("x = 1\n")
        await wait_until(lambda: len(pids_in(project / "pids")) >= 4)
        assert [pid for pid in first if alive(pid)] == []
        assert (await pipeline(engine))["restarts"] == 1


async def wait_for_watcher(engine: Engine) -> None:
    """The watcher of the first exec module has its roots registered."""
    from iii.modules.exec import Module

    module = next(m for m in engine.modules.values() if isinstance(m, Module))
    await wait_until(lambda: module.watching)


# -- watching --------------------------------------------------------------------------------


async def test_a_matching_change_restarts_others_do_not(project: Path) -> None:
    (project / "steps" / "nested").mkdir(parents=True)
    entry = exec_entry(exec=["echo $$ >> pids; exec sleep 600"], name="w", watch=["steps/**/*.py"])
    async with exec_engine(entry) as engine:
        await wait_until(lambda: pids_in(project / "pids"))
        await wait_for_watcher(engine)
        # Not matching: another extension, a hidden file, outside the root.
        (project / "steps" / "notes.txt").write_text("x")
        (project / "steps" / ".hidden.py").write_text("x")
        (project / "other.py").write_text("x")
        # Matching: a create deep down, then a change, a rename and a delete.
        for action in (
            lambda: (project / "steps" / "nested" / "a.py").write_text("a = 1\n"),
            lambda: (project / "steps" / "nested" / "a.py").write_text("a = 2\n"),
            lambda: (project / "steps" / "nested" / "a.py").rename(project / "steps" / "b.py"),
            lambda: (project / "steps" / "b.py").unlink(),
        ):
            count = len(pids_in(project / "pids"))
            action()
            await wait_until(lambda n=count: len(pids_in(project / "pids")) == n + 1)
        last = pids_in(project / "pids")[-1]
        with trio.fail_after(10):  # the child may write its pid before the engine notes it
            while (listed := await pipeline(engine))["pid"] != last:
                await trio.sleep(0.02)
        assert listed["restarts"] == 4 and listed["state"] == "running"


async def settled(
    engine: Engine, project: Path, exec_log: Callable[[], list[str]]
) -> dict[str, Any]:
    """The listing once every change written so far has been acted on.

    A last change (one rename, so one event, queued after every earlier one)
    restarts the worker, or joins the restart under way: either way the
    engine logs it, sorted first in the batch it came in.  A worker running
    after that line is the last one: the listing says ``restarting`` until
    the run that change asked for starts.
    """
    (project / "src" / ".settled.tmp").write_text("x")
    (project / "src" / ".settled.tmp").rename(project / "src" / "0-settled.py")
    await wait_until(lambda: any("'src/0-settled.py'" in line for line in exec_log()))
    with trio.fail_after(30):
        while not (
            (listed := await pipeline(engine))["state"] == "running"
            and listed["pid"] == pids_in(project / "pids")[-1]
        ):
            await trio.sleep(0.02)
    return listed


async def test_a_save_burst_is_one_restart_and_a_storm_is_bounded(
    project: Path, exec_log: Callable[[], list[str]]
) -> None:
    (project / "src").mkdir()
    entry = exec_entry(exec=["echo $$ >> pids; exec sleep 600"], name="w", watch=["src/*.py"])
    async with exec_engine(entry) as engine:
        await wait_until(lambda: pids_in(project / "pids"))
        await wait_for_watcher(engine)
        # An editor's save: a temporary file, a write, a rename over the original.
        for name in ("a.py", "b.py", "c.py"):
            (project / "src" / f".{name}.tmp").write_text("x")
            (project / "src" / f".{name}.tmp").rename(project / "src" / name)
        await wait_until(lambda: len(pids_in(project / "pids")) == 2)
        # A storm: 400 writes to 40 files over about two seconds.
        for round_ in range(10):
            for index in range(40):
                (project / "src" / f"f{index}.py").write_text(f"{round_}\n")
            await trio.sleep(0.2)
        # It settles into one running worker, after a few restarts, not hundreds.
        listed = await settled(engine, project, exec_log)
        assert 2 <= listed["restarts"] <= 13, listed
        running = [pid for pid in pids_in(project / "pids") if alive(pid)]
        assert running == [listed["pid"]]
        now = await pipeline(engine)
        assert (now["pid"], now["restarts"]) == (listed["pid"], listed["restarts"])


# -- output ----------------------------------------------------------------------------------


async def test_output_lines_are_prefixed_escaped_and_bounded(
    project: Path, exec_log: Callable[[], list[str]]
) -> None:
    script = (
        "printf 'plain\\n'; printf 'esc \\033[31mred\\033[0m\\n'; printf 'err line\\n' >&2; "
        "head -c 100000 /dev/zero | tr '\\0' x; printf '\\nafter long\\n'; "
        "printf '%s\\n' \"$(head -c 4006 /dev/zero | tr '\\0' y)\"; "
        "printf 'no end at exit'"
    )
    entry = exec_entry(exec=[script, "exec sleep 600"], name="out")
    async with exec_engine(entry):
        await wait_until(lambda: "[out] no end at exit" in exec_log())
    lines = exec_log()
    assert "[out] plain" in lines
    assert "[out] esc \\x1b[31mred\\x1b[0m" in lines
    assert "[out:stderr] err line" in lines
    long = [line for line in lines if line.startswith("[out] xxx")]
    # Cut at MAX_LINE_BYTES: the head is logged as soon as it is read.
    assert len(long) == 1 and len(long[0]) < MAX_LINE_BYTES + 100
    assert long[0].endswith("x… (line cut)")
    # A whole line over the bound: cut, saying by how much.
    assert [line[-20:] for line in lines if line.startswith("[out] yyy")] == [
        "yyyy… (6 more chars)"
    ]
    assert lines.index(long[0]) < lines.index("[out] after long")


async def test_a_flood_is_dropped_and_counted_while_the_engine_serves(
    project: Path, exec_log: Callable[[], list[str]]
) -> None:
    flood = exec_entry(exec=["exec yes flood"], name="lines")
    no_newline = exec_entry(exec=["cat /dev/zero"], name="zeros")
    async with exec_engine(flood, no_newline) as engine:
        await wait_until(lambda: any("lines of output dropped" in line for line in exec_log()))
        with trio.fail_after(10):
            while [p["state"] for p in await pipelines(engine)] != ["running", "running"]:
                await trio.sleep(0.02)
        # The engine keeps answering while both children write as fast as they
        # can, and what is logged is bounded by the line budget, not by the
        # flood: between two reports of dropped lines (at most one a second),
        # far more lines were dropped than logged, however long that took.
        seen = len(drop_reports(exec_log(), "lines"))
        with trio.fail_after(30):
            while len(reports := drop_reports(exec_log(), "lines")) < seen + 3:
                with trio.fail_after(10):
                    listed = await pipelines(engine)
                assert [p["state"] for p in listed] == ["running", "running"]
                await trio.sleep(0.05)
        (first, _), (_, dropped_1), (last, dropped_2) = reports[seen : seen + 3]
        logged = [line for line in exec_log()[first:last] if line.startswith("[lines] flood")]
        assert dropped_1 + dropped_2 >= 10 * len(logged), len(logged)
    cut = [line for line in exec_log() if line.startswith("[zeros] \\x00")]
    # One over-long line is logged as its head, once; the rest of it is skipped.
    assert len(cut) == 1 and cut[0].endswith("… (line cut)"), [c[:60] + c[-60:] for c in cut]


def drop_reports(lines: list[str], name: str) -> list[tuple[int, int]]:
    """(index, count) of each report of lines dropped from ``[name]``'s stdout."""
    reports = []
    for index, line in enumerate(lines):
        count, _, rest = line.removeprefix(f"[{name}] ").partition(" ")
        if line.startswith(f"[{name}] ") and count.isdigit() and rest.startswith("lines of output"):
            reports.append((index, int(count)))
    return reports


async def test_several_pipelines_run_side_by_side(project: Path) -> None:
    async with exec_engine(
        exec_entry(exec=["echo a >> ran; exec sleep 600"]),
        exec_entry(exec=["echo b >> ran; exec sleep 600"], name="second"),
        exec_entry(exec=["echo c >> ran; exec sleep 600"]),
    ) as engine:
        await wait_until(
            lambda: (project / "ran").exists() and len((project / "ran").read_text().split()) == 3
        )
        with trio.fail_after(10):  # a child may run before the engine notes its pid
            listed = await pipelines(engine)
            while not all(p["pid"] for p in listed):
                await trio.sleep(0.02)
                listed = await pipelines(engine)
        assert [p["name"] for p in listed] == ["echo", "second", "echo-2"]
        assert sorted(engine.modules) == sorted(
            ["exec:echo", "exec:second", "exec:echo-2", "worker", "telemetry"]
        )
        assert all(p["state"] == "running" and alive(p["pid"]) for p in listed)


def test_the_engines_own_source_is_not_on_the_workers_python_path() -> None:
    """The Python SDK's package is named ``iii`` too: the engine's must not shadow it."""
    from iii.modules.exec import worker_environment

    environment = worker_environment(
        {"PYTHONPATH": f"{ROOT}{os.pathsep}/opt/lib{os.pathsep}{ROOT}/", "KEEP": "1"}
    )
    assert environment == {"PYTHONPATH": "/opt/lib", "KEEP": "1"}
    assert worker_environment({"PYTHONPATH": str(ROOT)}) == {}
    assert worker_environment({"PYTHONPATH": "/opt/lib"}) == {"PYTHONPATH": "/opt/lib"}


async def test_lines_dropped_in_bulk_are_counted_like_lines_fed_one_by_one(
    exec_log: Callable[[], list[str]],
) -> None:
    from iii.modules.exec.process import _Lines

    data = [b"a\nbb\n", b"cc", b"c" * 5000, b"\nd\n", b"e" * 5000, b"f\ng"]
    fed = _Lines("[fed]", LineBudget(rate=0.0, burst=0))
    dropped = _Lines("[dropped]", LineBudget(rate=0.0, burst=0))
    for chunk in data:
        fed.feed(chunk)
        dropped.drop(chunk)

    def counted(lines: _Lines) -> int:
        reports = [line.split()[1] for line in exec_log() if line.startswith(lines.prefix)]
        return lines.budget.dropped + sum(int(count) for count in reports)

    # a, bb, the head of the c line, d, the head of the e line; "g" is pending.
    assert (counted(fed), fed.pending, fed.skipping) == (5, b"g", False)
    assert (counted(dropped), dropped.pending, dropped.skipping) == (5, b"g", False)
