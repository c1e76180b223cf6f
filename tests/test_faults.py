"""The engine killed (and stopped) and restarted under load, with SDK workers reconnecting.

A real ``python -m iii serve`` process; a 0.25 and a 0.4.1 worker each serve a
function and bind a ``log`` trigger (observability module) to another; four
callers invoke both functions continuously over loopback sockets and
reconnect when the engine is gone.  The engine is killed with SIGKILL and
restarted, then stopped with SIGTERM (workers get close code 1012) and
restarted.  After each restart every function answers again and every trigger
fires again, within a bound; the recovery times are printed.

Not covered here (they need modules other branches are building): queued jobs
surviving a restart (file store / Redis), and a Redis outage mid-run.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support import EngineProcess, start_sdk_worker
from tests.test_load import loopback_worker

pytestmark = [pytest.mark.sdk, pytest.mark.load]

# Calls that end in each steady phase (with four callers, some two seconds' worth).
STEADY_CALLS = 100

WORKER_025 = """
import sys
from iii import register_worker, InitOptions

iii = register_worker(sys.argv[1], InitOptions(worker_name="fault025", otel={"enabled": False}))
iii.register_function("f025::ping", lambda data: {"pong": "025"})
iii.register_function("f025::on_log", lambda data: print("LOG " + str(data.get("body")), flush=True))
iii.register_trigger({"type": "log", "function_id": "f025::on_log", "config": {"level": "warn"}})
print("READY", flush=True)
sys.stdin.readline()
iii.shutdown()
"""

WORKER_041 = """
import asyncio, sys
from iii import III, InitOptions

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name="fault041"))

    async def ping(data):
        return {"pong": "041"}

    async def on_log(data):
        print("LOG " + str(data.get("body")), flush=True)

    iii.register_function("f041::ping", ping)
    iii.register_function("f041::on_log", on_log)
    iii.register_trigger("log", "f041::on_log", {"level": "error"})
    await iii.connect()
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""

FUNCTIONS = ("f025::ping", "f041::ping")


async def probe(port: int, function_id: str, data: Any = None) -> str:
    """One call on a fresh connection: ``result``, the error code, or ``down``."""
    stage = "connect"
    try:
        with trio.fail_after(5):
            async with loopback_worker(port) as (worker, _):
                stage = "call"
                answer = await worker.call(function_id, data if data is not None else {}, timeout=5)
                stage = "close"
    except Exception as exc:  # refused, reset, rejected, timed out: the engine is not up
        if isinstance(exc, trio.TooSlowError):
            return f"timeout ({stage})"
        return f"down ({type(exc).__name__} in {stage})"
    return "result" if "error" not in answer else answer["error"]["code"]


async def recovered(
    engine: EngineProcess, workers: dict[str, Any], started: float
) -> dict[str, float]:
    """Seconds from ``started`` until the port is open, every function answers, every trigger fires."""
    times: dict[str, float] = {}
    with trio.fail_after(60):
        await engine.started(timeout=60)
        times["port open"] = trio.current_time() - started
        for function_id in FUNCTIONS:
            while await probe(engine.port, function_id) != "result":
                await trio.sleep(0.05)
            times[function_id] = trio.current_time() - started
        marker = f"after-restart-{started:.3f}"
        for version, level in (("0.25.0", "warn"), ("0.4.1", "error")):
            # The trigger is back once the worker has re-registered it: retry until it fires.
            while True:
                assert (
                    await probe(engine.port, f"engine::log::{level}", {"message": marker})
                    == "result"
                )
                with trio.move_on_after(0.5):
                    await workers[version].wait_for(f"LOG {marker}")
                    break
            times[f"log trigger ({version})"] = trio.current_time() - started
    return times


async def test_engine_killed_and_restarted_under_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "modules": [
            {
                "class": "modules::observability::OtelModule",
                "config": {"exporter": "memory", "prometheus_enabled": False},
            }
        ],
        "shutdown_grace_ms": 2000,
    }
    engine = EngineProcess.write(tmp_path, config)
    engine.start()
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    phase = "before"
    try:
        await engine.started()
        async with (
            start_sdk_worker("0.25.0", WORKER_025, url=engine.url) as w025,
            start_sdk_worker("0.4.1", WORKER_041, url=engine.url) as w041,
        ):
            workers = {"0.25.0": w025, "0.4.1": w041}
            await w025.wait_for("READY", timeout=40)
            await w041.wait_for("READY", timeout=40)
            baseline = await recovered(engine, workers, trio.current_time())

            async def caller(index: int) -> None:
                while True:
                    function_id = FUNCTIONS[index % 2]
                    begun_in = phase
                    outcome = await probe(engine.port, function_id)
                    # A call that spans a phase change (e.g. killed mid-call) counts apart.
                    outcomes[phase if phase == begun_in else "across a change"][outcome] += 1
                    await trio.sleep(0.01)

            async def steady_calls(phase: str) -> None:
                """A window of the phase: enough calls ended in it, however long they take."""
                with trio.fail_after(60):
                    while sum(outcomes[phase].values()) < STEADY_CALLS:
                        await trio.sleep(0.05)

            figures = {}
            async with trio.open_nursery() as load_nursery:
                for index in range(4):
                    load_nursery.start_soon(caller, index)
                await steady_calls("before")

                phase = "killed"
                engine.kill()  # SIGKILL: sockets dropped without a close frame
                started = trio.current_time()
                engine.start()
                figures["SIGKILL"] = await recovered(engine, workers, started)
                phase = "after kill"
                await steady_calls(phase)

                phase = "stopped"
                code = await trio.to_thread.run_sync(engine.terminate)  # SIGTERM: close 1012
                assert code == 0
                started = trio.current_time()
                engine.start()
                figures["SIGTERM"] = await recovered(engine, workers, started)
                phase = "after stop"
                await steady_calls(phase)
                load_nursery.cancel_scope.cancel()
    finally:
        engine.kill()
    with capsys.disabled():
        print(
            f"\nfirst start (from workers ready): {json.dumps({k: round(v, 2) for k, v in baseline.items()})}"
        )
        for name, times in figures.items():
            print(
                f"restart after {name}: " + json.dumps({k: round(v, 2) for k, v in times.items()})
            )
        print("calls by phase: " + json.dumps({k: dict(v) for k, v in outcomes.items()}))
    # Once recovered, every call is answered with a result.
    for steady in ("before", "after kill", "after stop"):
        assert set(outcomes[steady]) == {"result"}, (steady, outcomes[steady])
