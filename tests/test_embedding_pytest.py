"""The pytest plugin (iii.pytest_plugin), as a user meets it: the package
installs the entry point, and a sample user project (tests/embedding_sample:
a worker on the 0.25 SDK and two tests, one trio and one plain) passes under
``pytest`` in a process of its own; a failing user assertion fails it."""

from __future__ import annotations

import os
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import trio

from tests.support import sdk_python

pytestmark = pytest.mark.sdk

SAMPLE = Path(__file__).with_name("embedding_sample")

FAILING = """
import subprocess
from functools import partial

import trio


async def test_wrong_greeting_in_trio(iii_engine, greeter_argv):
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.run_process, [*greeter_argv, iii_engine.url], check=False))
        with trio.fail_after(30):
            await iii_engine.wait_for_function("greeter::hello")
        answer = await iii_engine.call("greeter::hello", {"name": "trio"})
        nursery.cancel_scope.cancel()
        assert answer == {"message": "bonjour trio"}


def test_wrong_greeting_in_a_plain_test(iii_engine_thread, greeter_argv):
    with subprocess.Popen([*greeter_argv, iii_engine_thread.url]) as worker:
        try:
            iii_engine_thread.wait_for_function("greeter::hello", timeout=30)
            answer = iii_engine_thread.call("greeter::hello", {"name": "sync"})
        finally:
            worker.kill()
    assert answer == {"message": "bonjour sync"}
"""


def require_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("iii") == "iii.pytest_plugin", (
        "the pytest11 entry point 'iii' is not installed: an install from before it "
        "existed? run `pip install -e .` again"
    )


def test_the_package_installs_the_plugin_entry_point():
    require_entry_point()


async def run_sample(tmp_path: Path, extra: dict[str, str] | None = None) -> tuple[int, str]:
    """Copy the sample project, add ``extra`` files, run pytest in it; (exit code, output)."""
    require_entry_point()
    project = tmp_path / "sample"
    shutil.copytree(SAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in (extra or {}).items():
        (project / name).write_text(text)
    python = await trio.to_thread.run_sync(sdk_python, "0.25.0")
    env = {**os.environ, "GREETER_PYTHON": str(python), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("PYTEST_ADDOPTS", None)
    with trio.fail_after(240):
        result = await trio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-rA"],
            cwd=project,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


async def test_the_sample_user_project_passes(tmp_path):
    code, output = await run_sample(tmp_path)
    assert code == 0, output
    assert "2 passed" in output, output
    assert "PASSED test_greeter.py::test_hello_in_trio" in output
    assert "PASSED test_greeter.py::test_hello_in_a_plain_test" in output


async def test_a_failing_user_assertion_fails_the_run(tmp_path):
    code, output = await run_sample(tmp_path, {"test_wrong.py": FAILING})
    assert code == 1, output
    assert "2 failed, 2 passed" in output, output
    assert "FAILED test_wrong.py::test_wrong_greeting_in_trio" in output
    assert "FAILED test_wrong.py::test_wrong_greeting_in_a_plain_test" in output
    assert "'bonjour trio'" in output and "'hello trio'" in output
