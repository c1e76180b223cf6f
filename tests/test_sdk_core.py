"""Official Python SDK workers (0.4.1 and 0.25.0) against the engine: the core protocol.

Each SDK runs in its own cached virtual environment (they conflict); the
engine runs in the test process, or as a real process where it must be killed
and restarted.
"""

from __future__ import annotations

import json

import pytest
import trio

from iii.testing import open_test_engine
from tests.sdk_workers import SCRIPTS, command
from tests.support import EngineProcess, start_sdk_worker

pytestmark = pytest.mark.sdk

VERSIONS = ("0.4.1", "0.25.0")


async def wait_function(engine, function_id, timeout=20):
    with trio.fail_after(timeout):
        while function_id not in engine.registry.functions:
            await trio.sleep(0.05)


async def test_both_sdks_register_call_and_list():
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=url, args=("w041",)) as old, start_sdk_worker(
            "0.25.0", SCRIPTS["0.25.0"], url=url, args=("w025",)
        ) as new:
            await old.wait_for("READY")
            await new.wait_for("READY")
            assert await command(old, op="register", id="old::echo") == ("OK", None)
            assert await command(new, op="register", id="new::echo") == ("OK", None)
            await wait_function(engine, "old::echo")
            await wait_function(engine, "new::echo")

            status, value = await command(old, op="call", fn="new::echo", data={"a": 1})
            assert status == "OK" and value["by"] == "0.25.0" and value["echo"]["a"] == 1
            assert value["echo"]["_caller_worker_id"] in engine.connections
            status, value = await command(new, op="call", fn="old::echo", data={"b": 2})
            assert status == "OK" and value["by"] == "0.4.1" and value["echo"]["b"] == 2

            # A payload of None: both SDKs leave "data" out; the engine reads null.
            status, value = await command(new, op="call", fn="old::echo", data=None)
            assert (status, value["echo"]) == ("OK", None)

            # Fire-and-forget from both sides still runs the function.
            assert await command(old, op="void", fn="new::echo", data={"v": "from-old"}) == ("OK", None)
            await new.wait_for("CALLED new::echo", contains='"v": "from-old"')
            assert await command(new, op="void", fn="old::echo", data={"v": "from-new"}) == ("OK", None)
            await old.wait_for("CALLED old::echo", contains='"v": "from-new"')

            for worker in (old, new):
                status, error = await command(worker, op="call", fn="nope::missing", data={})
                assert (status, error["code"]) == ("ERR", "function_not_found")

            assert await command(old, op="register", id="old::fail", kind="fail") == ("OK", None)
            await wait_function(engine, "old::fail")
            status, error = await command(new, op="call", fn="old::fail", data={})
            assert (status, error) == ("ERR", {"code": "invocation_failed", "message": "boom!"})

            for worker in (old, new):
                status, functions = await command(worker, op="functions")
                assert status == "OK" and {"old::echo", "new::echo", "old::fail"} <= set(functions)
            status, workers = await command(old, op="workers")
            assert status == "OK"
            by_name = {w["name"]: w for w in workers}
            assert by_name["w041"]["functions"] == ["old::echo", "old::fail"]
            assert by_name["w025"]["functions"] == ["new::echo"]


@pytest.mark.parametrize("caller_version", VERSIONS)
async def test_killed_worker_process_stops_its_calls(caller_version):
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        target_version = "0.25.0" if caller_version == "0.4.1" else "0.4.1"
        async with start_sdk_worker(caller_version, SCRIPTS[caller_version], url=url) as caller:
            async with start_sdk_worker(target_version, SCRIPTS[target_version], url=url) as target:
                await target.wait_for("READY")
                await command(target, op="register", id="slow::fn", kind="slow")
                await wait_function(engine, "slow::fn")
                await caller.wait_for("READY")
                await caller.send_line('{"op": "call", "fn": "slow::fn", "data": {}, "timeout": 25}')
                await target.wait_for("CALLED slow::fn")
                target.kill()
                with trio.fail_after(20):
                    line = await caller.wait_for("ERR")
                assert '"invocation_stopped"' in line, line


@pytest.mark.parametrize("provider_version", VERSIONS)
async def test_worker_provided_trigger_types(provider_version):
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        other = "0.25.0" if provider_version == "0.4.1" else "0.4.1"
        async with start_sdk_worker(provider_version, SCRIPTS[provider_version], url=url) as provider:
            await provider.wait_for("READY")
            await command(provider, op="trigger_type", id="demo-type")
            async with start_sdk_worker(other, SCRIPTS[other], url=url) as registrant:
                await registrant.wait_for("READY")
                await command(registrant, op="register", id="hook::target")
                await command(registrant, op="trigger", type="demo-type", fn="hook::target", config={"a": 1})
                added = json.loads((await provider.wait_for("TRIGGER+"))[9:])
                assert added["function_id"] == "hook::target" and added["config"] == {"a": 1}
            if provider_version == "0.25.0":  # 0.4.1 never acts on an engine unregistertrigger
                removed = json.loads((await provider.wait_for("TRIGGER-"))[9:])
                assert removed["id"] == added["id"]
        with trio.fail_after(10):
            while engine.registry.triggers:
                await trio.sleep(0.05)


async def test_engine_restart_both_sdks_come_back(tmp_path):
    engine = EngineProcess.write(tmp_path, {"modules": []})
    engine.start()
    try:
        await engine.started()
        async with start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=engine.url) as old, start_sdk_worker(
            "0.25.0", SCRIPTS["0.25.0"], url=engine.url
        ) as new:
            await old.wait_for("READY")
            await new.wait_for("READY")
            await command(old, op="register", id="old::echo")
            await command(old, op="trigger_type", id="restart-type")
            await command(new, op="register", id="new::echo")
            await command(new, op="trigger", type="restart-type", fn="new::echo", config={"n": 1})
            await old.wait_for("TRIGGER+")
            assert (await command(new, op="call", fn="old::echo", data={"x": 0}))[0] == "OK"

            for stop in ("kill", "terminate"):
                if stop == "kill":
                    engine.kill()
                else:
                    assert engine.terminate() == 0
                engine.start()
                await engine.started()
                # Both SDKs reconnect by themselves and replay their registrations.
                line = await old.wait_for("TRIGGER+", timeout=40)
                assert '"function_id": "new::echo"' in line
                for _ in range(200):
                    status_a, a = await command(new, op="call", fn="old::echo", data={"after": stop}, timeout=40)
                    status_b, b = await command(old, op="call", fn="new::echo", data={"after": stop}, timeout=40)
                    if status_a == status_b == "OK":
                        break
                    await trio.sleep(0.2)
                assert (status_a, a["echo"]["after"]) == ("OK", stop)
                assert (status_b, b["echo"]["after"]) == ("OK", stop)
    finally:
        engine.kill()
