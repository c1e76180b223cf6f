"""A scriptable official-SDK worker for the module tests (0.4.1, 0.9.0 and 0.25.0).

:func:`sdk_worker` starts a worker that registers ``handlers`` (each prints
``EVENT <function_id> <json data>`` and returns its configured result) and
``triggers`` (``(type, function_id, config)``), prints ``READY``, then runs
``call`` commands from stdin: :meth:`Driver.call` returns the result or raises
:class:`SdkCallError` with the error the SDK reported.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from tests.support import SdkWorker, start_sdk_worker

SCRIPT_041 = r'''
import asyncio, json, sys
from iii import III, InitOptions

SPEC = json.loads(%(spec)r)

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name="sdk041"))
    for fid, result in SPEC["handlers"].items():
        def make(fid=fid, result=result):
            async def handler(data):
                print("EVENT " + fid + " " + json.dumps(data), flush=True)
                return result
            return handler
        iii.register_function(fid, make())
    for kind, fid, config in SPEC["triggers"]:
        iii.register_trigger(kind, fid, config)
    await iii.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        try:
            out = await iii.trigger(cmd["fn"], cmd.get("data"), timeout=20)
            print("OK " + json.dumps(out), flush=True)
        except Exception as exc:
            print("ERR " + json.dumps({"message": str(exc), "code": getattr(exc, "code", None)}), flush=True)

asyncio.run(main())
'''

SCRIPT_025 = r'''
import json, sys, threading
from iii import register_worker, InitOptions, InvocationError

SPEC = json.loads(%(spec)r)
PRINT = threading.Lock()  # sync handlers run in threads: one line at a time
iii = register_worker(sys.argv[1], InitOptions(worker_name="sdk025", otel={"enabled": False}))
for fid, result in SPEC["handlers"].items():
    def make(fid=fid, result=result):
        def handler(data):
            with PRINT:
                print("EVENT " + fid + " " + json.dumps(data), flush=True)
            return result
        return handler
    iii.register_function(fid, make())
for kind, fid, config in SPEC["triggers"]:
    iii.register_trigger({"type": kind, "function_id": fid, "config": config})
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        out = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data")})
        line = "OK " + json.dumps(out)
    except InvocationError as exc:
        line = "ERR " + json.dumps({"code": exc.code, "message": exc.message})
    except Exception as exc:
        line = "ERR " + json.dumps({"code": None, "message": str(exc)})
    with PRINT:
        print(line, flush=True)
iii.shutdown()
'''

# 0.9.0: functions are registered with {"id": ...}, and an error result is
# raised as Exception(str(error_dict)): its code and message are read back.
SCRIPT_090 = r'''
import ast, json, sys, threading
from iii import register_worker, InitOptions

SPEC = json.loads(%(spec)r)
PRINT = threading.Lock()  # sync handlers run in the SDK's executor threads
iii = register_worker(sys.argv[1], InitOptions(worker_name="sdk090"))
for fid, result in SPEC["handlers"].items():
    def make(fid=fid, result=result):
        def handler(data):
            with PRINT:
                print("EVENT " + fid + " " + json.dumps(data), flush=True)
            return result
        return handler
    iii.register_function({"id": fid}, make())
for kind, fid, config in SPEC["triggers"]:
    iii.register_trigger({"type": kind, "function_id": fid, "config": config})
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        out = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data")})
        line = "OK " + json.dumps(out)
    except Exception as exc:
        text = str(exc)
        try:
            body = ast.literal_eval(text) if text.startswith("{") else None
        except Exception:
            body = None
        if not isinstance(body, dict):
            body = {"code": None, "message": text}
        line = "ERR " + json.dumps({"code": body.get("code"), "message": body.get("message")})
    with PRINT:
        print(line, flush=True)
iii.shutdown()
'''

SCRIPTS = {"0.4.1": SCRIPT_041, "0.9.0": SCRIPT_090, "0.25.0": SCRIPT_025}
VERSIONS = tuple(SCRIPTS)


class SdkCallError(Exception):
    def __init__(self, body: dict[str, Any]):
        super().__init__(body.get("message"))
        self.code = body.get("code")
        self.message = body.get("message") or ""


class Driver:
    def __init__(self, worker: SdkWorker):
        self.worker = worker
        self.events: list[tuple[str, Any]] = []

    async def call(self, function_id: str, data: Any = None) -> Any:
        status, rest = await self.worker.request(
            json.dumps({"fn": function_id, "data": data}), on_line=self._record
        )
        if status == "ERR":
            raise SdkCallError(json.loads(rest))
        return json.loads(rest)

    def _record(self, line: str) -> None:
        if line.startswith("EVENT "):
            _, fid, payload = line.split(" ", 2)
            self.events.append((fid, json.loads(payload)))

    async def _next_line(self) -> str:
        line = await self.worker.lines.receive()
        self._record(line)
        return line

    async def wait_events(self, count: int, function_id: str | None = None, timeout: float = 20) -> list[Any]:
        """Wait until ``count`` events (of ``function_id``, if given) were seen; returns their data."""

        def matching() -> list[Any]:
            return [d for f, d in self.events if function_id is None or f == function_id]

        with trio.fail_after(timeout):
            while len(matching()) < count:
                await self._next_line()
        return matching()


@asynccontextmanager
async def sdk_worker(
    version: str, url: str, *, handlers: dict[str, Any] | None = None, triggers: list[Any] | None = None
) -> AsyncIterator[Driver]:
    spec = json.dumps({"handlers": handlers or {}, "triggers": triggers or []})
    script = SCRIPTS[version] % {"spec": spec}
    async with start_sdk_worker(version, script, url=url) as worker:
        await worker.wait_for("READY", timeout=60)
        yield Driver(worker)


async def wait_registered(engine: Any, function_ids: list[str], triggers: int = 0, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not (set(function_ids) <= set(engine.registry.functions) and len(engine.registry.triggers) >= triggers):
            await trio.sleep(0.02)
