"""Official Python SDK workers (0.4.1 and 0.25.0) against the engine: the core protocol."""

from __future__ import annotations

import json

import pytest
import trio

from iii.testing import open_test_engine
from tests.support import start_sdk_worker

pytestmark = pytest.mark.sdk

WORKER_041 = """
import asyncio, json, sys
from iii import III, InitOptions

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name="w041"))

    async def echo(data):
        return {"echo": data}

    iii.register_function("w041::echo", echo, description="Echo")
    await iii.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        try:
            if cmd["op"] == "call":
                out = await iii.trigger(cmd["fn"], cmd.get("data"), timeout=cmd.get("timeout", 10))
            elif cmd["op"] == "void":
                iii.trigger_void(cmd["fn"], cmd.get("data"))
                out = None
            elif cmd["op"] == "functions":
                out = sorted(f.function_id for f in await iii.list_functions())
            elif cmd["op"] == "workers":
                out = [{"name": w.name, "functions": w.functions} for w in await iii.list_workers()]
            print("OK " + json.dumps(out), flush=True)
        except Exception as exc:
            print("ERR " + str(exc), flush=True)

asyncio.run(main())
"""

WORKER_025 = """
import json, sys
from iii import register_worker, InitOptions, InvocationError, TriggerAction

iii = register_worker(sys.argv[1], InitOptions(worker_name="w025", otel={"enabled": False}))

def add(data):
    return {"sum": data["a"] + data["b"]}

iii.register_function("w025::add", add, description="Adds")
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "call":
            out = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data")})
        elif cmd["op"] == "void":
            out = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data"), "action": TriggerAction.Void()})
        print("OK " + json.dumps(out), flush=True)
    except InvocationError as exc:
        print("ERR " + json.dumps({"code": exc.code, "message": exc.message}), flush=True)
iii.shutdown()
"""


async def command(worker, **cmd):
    await worker.send_line(json.dumps(cmd))
    line = await worker.wait_for(("OK " if True else ""), timeout=20) if False else None
    with trio.fail_after(20):
        while True:
            async for line in worker.lines:
                if line.startswith("OK ") or line.startswith("ERR "):
                    return line
            raise AssertionError("worker exited")


async def wait_function(engine, function_id, timeout=20):
    with trio.fail_after(timeout):
        while function_id not in engine.registry.functions:
            await trio.sleep(0.05)


async def test_both_sdks_call_each_other():
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker("0.4.1", WORKER_041, url=url) as w041, start_sdk_worker(
            "0.25.0", WORKER_025, url=url
        ) as w025:
            await w041.wait_for("READY")
            await w025.wait_for("READY")
            await wait_function(engine, "w041::echo")
            await wait_function(engine, "w025::add")

            line = await command(w041, op="call", fn="w025::add", data={"a": 2, "b": 3})
            assert line == 'OK {"sum": 5}'
            line = await command(w025, op="call", fn="w041::echo", data={"v": 1})
            result = json.loads(line[3:])
            assert result["echo"]["v"] == 1
            assert result["echo"]["_caller_worker_id"] in engine.connections

            line = await command(w025, op="call", fn="nope::missing", data={})
            assert json.loads(line[4:])["code"] == "function_not_found"
            line = await command(w041, op="call", fn="nope::missing", data={})
            assert line.startswith("ERR ") and "function_not_found" in line

            line = await command(w041, op="functions")
            assert {"w041::echo", "w025::add"} <= set(json.loads(line[3:]))
            line = await command(w041, op="workers")
            workers = json.loads(line[3:])
            by_name = {w["name"]: w for w in workers}
            assert by_name["w041"]["functions"] == ["w041::echo"]
            assert by_name["w025"]["functions"] == ["w025::add"]
