"""The command line as users run it: ``python -m iii ...`` in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import yaml

from iii import cli
from tests.support import ROOT, reserve_port


def run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "iii", *args],
        capture_output=True,
        text=True,
        cwd=kwargs.pop("cwd", ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        **kwargs,
    )


def test_check_config_ok_and_error(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("port: 4000\n")
    result = run("check-config", str(good))
    assert result.returncode == 0 and "ok" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 4000\nmodules:\n  - class: modules::api::RestApiModul\n")
    result = run("check-config", str(bad))
    assert result.returncode == 2
    assert (
        str(bad) in result.stderr
        and "modules[0].class" in result.stderr
        and "RestApiModul" in result.stderr
    )


def test_config_show_fills_defaults(tmp_path):
    result = run("config", "show", cwd=tmp_path)
    assert result.returncode == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["port"] == 49134 and shown["invocation_timeout_ms"] == 30000
    assert {
        "class": "modules::worker::WorkerModule",
        "config": {"functions_debounce_ms": 200},
    } in shown["modules"]
    result = run("config", "show", "--format", "toml", cwd=tmp_path)
    assert tomllib.loads(result.stdout)["port"] == 49134


def test_serve_then_sigterm_exits_zero(tmp_path):
    port = reserve_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"port: {port}\nmodules: []\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "iii", "serve", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.time() + 20
        import socket

        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "listening" in output and "stopped" in output


def test_serve_with_a_bad_config_exits_two(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("port: ${UNSET_FOR_CLI_TEST}\n")
    result = run("serve", "-c", str(config))
    assert result.returncode == 2
    assert "UNSET_FOR_CLI_TEST" in result.stderr


def test_port_in_use_is_a_one_line_crash(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(f"port: {port}\nmodules: []\n")
        result = run("serve", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("iii: cannot start")


# -- hostile config files through the real CLI (issue 10 row 13) -------------------------


def _cap_memory() -> None:
    """Runs in the child: 1 GiB of address space, so a bomb fails small either way."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


async def _run_capped(*args: str) -> subprocess.CompletedProcess[bytes]:
    import trio

    with trio.fail_after(60):  # generous: the fixed loader answers in well under a second
        return await trio.run_process(
            [sys.executable, "-m", "iii", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=_cap_memory,
        )


def _bombs(tmp_path):
    from tests.test_config import billion_laughs

    files = {
        "laughs.yaml": (billion_laughs(), "alias"),
        "deep.yaml": ("x: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested"),
        "deep.toml": ("x = " + "[" * 20_000 + "]" * 20_000 + "\n", "nested"),
        "dup.yaml": ("port: 4000\nport: 5000\n", "duplicate key"),
    }
    for name, (text, reason) in files.items():
        (tmp_path / name).write_text(text)
        yield tmp_path / name, reason


@pytest.mark.parametrize("command", ["check-config", "serve", "config show"])
async def test_config_bombs_exit_two_with_one_line(tmp_path, command):
    for path, reason in _bombs(tmp_path):
        if command == "check-config":
            args = ["check-config", str(path)]
        else:
            args = [*command.split(), "-c", str(path)]
        result = await _run_capped(*args)
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 2, (path.name, stderr[-2000:])
        assert stderr.startswith(f"iii: config error: {path}: "), (path.name, stderr[-2000:])
        assert reason in stderr and "Traceback" not in stderr and stderr.count("\n") == 1


def test_serve_sets_the_collector_policy():
    """``serve`` freezes what startup loaded and raises the young threshold (cli._tune_gc)."""
    code = (
        "import gc\nfrom iii import cli\ncli._tune_gc()\n"
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(cli.GC_YOUNG_THRESHOLD), "True"]
