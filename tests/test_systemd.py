"""The systemd unit and the sd_notify protocol, against a real ``python -m iii serve``.

* ``systemd-analyze verify`` accepts ``packaging/systemd/iii.service`` (with
  ExecStart pointed at the ``iii`` script installed here) and prints nothing;
  a broken copy makes it complain, so the check can fail.
* A datagram socket standing in for systemd's ``NOTIFY_SOCKET`` receives
  ``READY=1`` (with the listener already accepting), ``WATCHDOG=1`` pings and,
  after SIGTERM, ``STOPPING=1``, in that order; the engine then exits 0.
* A config error exits with status 2 (``RestartPreventExitStatus=2``).
* The stop path systemd takes with ``KillMode=mixed`` (SIGTERM to the engine
  alone) leaves no process of the exec module's workers, not even those
  that ignore SIGTERM or left the process group; ``TimeoutStopSec`` covers
  the drain and the workers' grace period.

Needs Debian's ``systemd`` package for ``systemd-analyze`` (``apt-get install
-y systemd``); those tests skip without it unless ``III_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from iii.config import EngineConfig
from iii.modules.exec import Config as ExecConfig
from iii.systemd import Notifier
from tests.support import ROOT, EngineProcess, services_required

UNIT = ROOT / "packaging" / "systemd" / "iii.service"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        message = "systemd-analyze is missing (apt-get install -y systemd)"
        if services_required():
            pytest.fail(message)
        pytest.skip(message)
    return found


def installed_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this environment's ``iii`` script."""
    script = Path(sys.executable).parent / "iii"
    assert script.exists(), "pip install -e . provides the iii script"
    unit = tmp_path / "iii.service"
    unit.write_text((text or UNIT.read_text()).replace("/usr/local/bin/iii", str(script)))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    unit = installed_unit(tmp_path)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stdout + result.stderr, result.stderr
    # The same check on a broken copy complains (so the check above can fail).
    (tmp_path / "broken").mkdir()
    broken = installed_unit(
        tmp_path / "broken", UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs=")
    )
    result = subprocess.run(
        [analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'WatchdogSecs'" in result.stderr


def test_unit_settings(tmp_path: Path) -> None:
    """The settings the engine relies on, and systemd's own exposure score."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "StateDirectory=iii",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    # SIGTERM to the engine alone: it stops the exec module's workers itself,
    # after draining; systemd SIGKILLs what is left of the unit's cgroup.
    assert re.search(r"^KillMode=mixed$", text, re.M)
    timeout = re.search(r"^TimeoutStopSec=(\d+)$", text, re.M)
    assert timeout, "TimeoutStopSec in seconds"
    drain = EngineConfig().shutdown_grace_ms / 1000 + 2  # drain, then close the workers
    assert int(timeout.group(1)) > drain + ExecConfig(exec=("x",)).stop_grace_ms / 1000
    analyze = systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(
        r"Overall exposure level for iii\.service: ([\d.]+)", result.stdout + result.stderr
    )
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0  # "OK" on systemd's 0-10 scale


def test_notifier_reads_the_environment() -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "2000000"})
    assert notifier.address == "\0abstract" and notifier.watchdog_interval == 1.0
    # WATCHDOG_PID naming another process: the watchdog is not ours.
    other = Notifier.from_environ(
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval is None
    assert not Notifier.from_environ({}).enabled


async def test_ready_watchdog_stopping_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock_path = tmp_path / "notify.sock"
    receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await receiver.bind(str(sock_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    engine = EngineProcess.write(tmp_path, {"modules": []})
    messages: list[str] = []

    async def next_message() -> list[str]:
        data = await receiver.recv(4096)
        fields = data.decode().split("\n")
        messages.extend(fields)
        return fields

    with receiver:
        engine.start()
        try:
            with trio.fail_after(30):
                while "READY=1" not in await next_message():
                    pass
                # READY=1 means the worker port accepts connections now.
                stream = await trio.open_tcp_stream("127.0.0.1", engine.port)
                await stream.aclose()
                pings = 0
                while pings < 3:
                    pings += (await next_message()).count("WATCHDOG=1")
                assert engine.process is not None
                engine.process.terminate()
                while "STOPPING=1" not in await next_message():
                    pass
                code = await trio.to_thread.run_sync(engine.process.wait, 20)
        finally:
            engine.kill()
    assert code == 0, engine.log_text()
    ready, stopping = messages.index("READY=1"), messages.index("STOPPING=1")
    assert messages[0] == "READY=1", messages
    watchdogs = [i for i, m in enumerate(messages) if m == "WATCHDOG=1"]
    assert ready < watchdogs[0] and len([i for i in watchdogs if i < stopping]) >= 3
    assert any(m.startswith("STATUS=listening on ws://127.0.0.1:") for m in messages)


def test_config_error_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("port: not-a-port\n")
    result = subprocess.run(
        [sys.executable, "-m", "iii", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert "config error" in result.stderr and "port" in result.stderr


# A worker as stubborn as they come: ignores SIGTERM, and so do its child in
# its process group and its grandchild that left the group (setsid).
STUBBORN = (
    "trap '' TERM; echo $$ >> pids; (trap '' TERM; sleep 600) & echo $! >> pids; "
    "setsid sh -c 'trap \"\" TERM; echo $$ >> pids; exec sleep 600' & "
    "while :; do sleep 1; done"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


async def test_the_stop_path_leaves_no_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What systemd does on ``systemctl stop`` (KillMode=mixed): SIGTERM to the engine only."""
    sock_path = tmp_path / "notify.sock"
    receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await receiver.bind(str(sock_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    exec_block = {"exec": [STUBBORN], "name": "stubborn", "stop_grace_ms": 500}
    engine = EngineProcess.write(
        tmp_path, {"modules": [{"class": "modules::shell::ExecModule", "config": exec_block}]}
    )
    pids_file = tmp_path / "pids"
    pids: list[int] = []
    with receiver:
        engine.start()
        try:
            with trio.fail_after(30):
                while b"READY=1" not in await receiver.recv(4096):
                    pass
                while len(pids) < 3:
                    await trio.sleep(0.05)
                    if pids_file.exists():
                        pids = [int(word) for word in pids_file.read_text().split()]
            assert all(_alive(pid) for pid in pids)
            assert engine.process is not None
            engine.process.terminate()
            with trio.fail_after(30):
                while b"STOPPING=1" not in await receiver.recv(4096):
                    pass
            code = await trio.to_thread.run_sync(engine.process.wait, 30)
        finally:
            engine.kill()
            survivors = [pid for pid in pids if _alive(pid)]
            for pid in survivors:
                os.kill(pid, 9)
    assert code == 0, engine.log_text()[-3000:]
    assert survivors == []
