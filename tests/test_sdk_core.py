"""Official Python SDK workers (0.4.1, 0.9.0 and 0.25.0) against the engine: the core protocol.

Each SDK runs in its own cached virtual environment (they conflict); the
engine runs in the test process, or as a real process where it must be killed
and restarted.  0.9.0 is the generation Motia 1.0 runs on.
"""

from __future__ import annotations

import json

import pytest
import trio

from iii.testing import open_test_engine
from tests.sdk_workers import SCRIPTS, command, produced
from tests.support import EngineProcess, start_sdk_worker

pytestmark = pytest.mark.sdk

VERSIONS = ("0.4.1", "0.9.0", "0.25.0")


def other_than(version: str) -> str:
    """An SDK generation to pair ``version`` with."""
    return "0.25.0" if version == "0.4.1" else "0.4.1"


async def wait_function(engine, function_id, timeout=20):
    with trio.fail_after(timeout):
        while function_id not in engine.registry.functions:
            await trio.sleep(0.05)


async def test_both_sdks_register_call_and_list():
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with (
            start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=url, args=("w041",)) as old,
            start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=url, args=("w025",)) as new,
        ):
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
            assert await command(old, op="void", fn="new::echo", data={"v": "from-old"}) == (
                "OK",
                None,
            )
            await new.wait_for("CALLED new::echo", contains='"v": "from-old"')
            assert await command(new, op="void", fn="old::echo", data={"v": "from-new"}) == (
                "OK",
                None,
            )
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


@pytest.mark.parametrize("other", ["0.4.1", "0.25.0"])
async def test_sdk_090_calls_both_ways(other):
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with (
            start_sdk_worker("0.9.0", SCRIPTS["0.9.0"], url=url, args=("w090",)) as w090,
            start_sdk_worker(other, SCRIPTS[other], url=url, args=("wother",)) as peer,
        ):
            await w090.wait_for("READY", timeout=60)
            await peer.wait_for("READY", timeout=60)
            assert await command(w090, op="register", id="w090::echo") == ("OK", None)
            assert await command(w090, op="register", id="w090::fail", kind="fail") == ("OK", None)
            assert await command(peer, op="register", id="peer::echo") == ("OK", None)
            for function_id in ("w090::echo", "w090::fail", "peer::echo"):
                await wait_function(engine, function_id)

            status, value = await command(w090, op="call", fn="peer::echo", data={"a": 1})
            assert (status, value["by"], value["echo"]["a"]) == ("OK", other, 1)
            status, value = await command(peer, op="call", fn="w090::echo", data={"b": [2, None]})
            assert (status, value["by"], value["echo"]["b"]) == ("OK", "0.9.0", [2, None])
            assert value["echo"]["_caller_worker_id"] in engine.connections
            status, value = await command(w090, op="call", fn="peer::echo", data=None)
            assert (status, value["echo"]) == ("OK", None)

            # Fire-and-forget both ways.
            assert await command(w090, op="void", fn="peer::echo", data={"v": "from-090"}) == (
                "OK",
                None,
            )
            await peer.wait_for("CALLED peer::echo", contains='"v": "from-090"')
            assert await command(peer, op="void", fn="w090::echo", data={"v": "to-090"}) == (
                "OK",
                None,
            )
            await w090.wait_for("CALLED w090::echo", contains='"v": "to-090"')

            # Errors, as each SDK reports them.
            status, error = await command(w090, op="call", fn="nope::missing", data={})
            assert (status, error["code"]) == ("ERR", "function_not_found")
            status, error = await command(peer, op="call", fn="w090::fail", data={})
            assert (status, error) == ("ERR", {"code": "invocation_failed", "message": "boom!"})
            status, error = await command(w090, op="call", fn="w090::fail", data={})
            assert (status, error) == ("ERR", {"code": "invocation_failed", "message": "boom!"})

            status, functions = await command(w090, op="functions")
            assert status == "OK" and {"w090::echo", "w090::fail", "peer::echo"} <= set(functions)
            status, workers = await command(w090, op="workers")
            assert status == "OK"
            by_name = {w["name"]: w for w in workers}
            assert sorted(by_name["w090"]["functions"]) == ["w090::echo", "w090::fail"]
            assert by_name["wother"]["functions"] == ["peer::echo"]


async def test_sdk_090_reads_channels_written_by_090_and_025():
    """Worker-to-worker channels: 0.9.0 creates one, fires a function with its
    writer, and reads binary chunks and text messages to the end."""
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with (
            start_sdk_worker("0.9.0", SCRIPTS["0.9.0"], url=url) as w090,
            start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=url) as w025,
        ):
            await w090.wait_for("READY", timeout=60)
            await w025.wait_for("READY", timeout=60)
            await command(w090, op="register", id="w090::produce", kind="produce")
            await command(w025, op="register", id="w025::produce", kind="produce")
            await wait_function(engine, "w090::produce")
            await wait_function(engine, "w025::produce")
            for producer in ("w090::produce", "w025::produce"):
                status, value = await command(w090, op="channel_read", fn=producer, n=20)
                assert (status, value) == ("OK", produced(20)), producer  # 320 KiB, in order
            with trio.fail_after(10):
                while len(engine.channels):
                    await trio.sleep(0.05)


@pytest.mark.parametrize("caller_version", VERSIONS)
async def test_killed_worker_process_stops_its_calls(caller_version):
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        target_version = other_than(caller_version)
        async with start_sdk_worker(caller_version, SCRIPTS[caller_version], url=url) as caller:
            async with start_sdk_worker(target_version, SCRIPTS[target_version], url=url) as target:
                await target.wait_for("READY")
                await command(target, op="register", id="slow::fn", kind="slow")
                await wait_function(engine, "slow::fn")
                await caller.wait_for("READY")
                await caller.send_line(
                    '{"op": "call", "fn": "slow::fn", "data": {}, "timeout": 25}'
                )
                await target.wait_for("CALLED slow::fn")
                target.kill()
                with trio.fail_after(20):
                    line = await caller.wait_for("ERR")
                assert '"invocation_stopped"' in line, line


@pytest.mark.parametrize("provider_version", VERSIONS)
async def test_worker_provided_trigger_types(provider_version):
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        other = other_than(provider_version)
        async with start_sdk_worker(
            provider_version, SCRIPTS[provider_version], url=url
        ) as provider:
            await provider.wait_for("READY")
            await command(provider, op="trigger_type", id="demo-type")
            async with start_sdk_worker(other, SCRIPTS[other], url=url) as registrant:
                await registrant.wait_for("READY")
                await command(registrant, op="register", id="hook::target")
                await command(
                    registrant, op="trigger", type="demo-type", fn="hook::target", config={"a": 1}
                )
                added = json.loads((await provider.wait_for("TRIGGER+"))[9:])
                assert added["function_id"] == "hook::target" and added["config"] == {"a": 1}
            if provider_version == "0.25.0":  # 0.4.1 and 0.9.0 never act on an unregistertrigger
                removed = json.loads((await provider.wait_for("TRIGGER-"))[9:])
                assert removed["id"] == added["id"]
        with trio.fail_after(10):
            while engine.registry.triggers:
                await trio.sleep(0.05)


@pytest.mark.parametrize("provider_version", ["0.4.1", "0.9.0"])
async def test_engine_restart_both_sdks_come_back(provider_version, tmp_path):
    """``old`` (0.4.1 or 0.9.0) provides a trigger type, 0.25.0 registers a trigger of it."""
    engine = EngineProcess.write(tmp_path, {"modules": []})
    engine.start()
    try:
        await engine.started()
        async with (
            start_sdk_worker(provider_version, SCRIPTS[provider_version], url=engine.url) as old,
            start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=engine.url) as new,
        ):
            await old.wait_for("READY", timeout=60)
            await new.wait_for("READY", timeout=60)
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
                    status_a, a = await command(
                        new, op="call", fn="old::echo", data={"after": stop}, timeout=40
                    )
                    status_b, b = await command(
                        old, op="call", fn="new::echo", data={"after": stop}, timeout=40
                    )
                    if status_a == status_b == "OK":
                        break
                    await trio.sleep(0.2)
                assert (status_a, a["echo"]["after"]) == ("OK", stop)
                assert (status_b, b["echo"]["after"]) == ("OK", stop)
    finally:
        engine.kill()
