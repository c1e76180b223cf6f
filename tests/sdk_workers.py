"""The one harness for official Python SDK workers (0.4.1, 0.9.0, 0.25.0) in the tests.

Each script in :data:`SCRIPTS` connects to ``sys.argv[1]``, prints ``READY``,
then reads one JSON command per stdin line and prints one line per command:
``OK <json>`` or ``ERR <json {code, message}>``.  Functions it hosts print
``CALLED <function_id> <json data>`` when invoked; trigger-type handlers print
``TRIGGER+ <json>`` / ``TRIGGER- <json>``.

Commands: ``{"op": "register", "id", "kind": "echo"|"slow"|"fail"|"produce"}``,
``{"op": "call", "fn", "data", "timeout"?}``, ``{"op": "void", "fn", "data"}``,
``{"op": "trigger_type", "id"}``, ``{"op": "trigger", "type", "fn", "config"}``,
``{"op": "functions"}``, ``{"op": "workers"}`` (0.4.1 and 0.9.0).
Services (0.4.1 and 0.9.0; 0.25.0 has no ``register_service``):
``{"op": "service", "id", "description"?, "parent"?}`` on 0.4.1,
``{"op": "service", "id", "name"?, "description"?, "parent_service_id"?}`` on
0.9.0, and ``{"op": "services"}`` (``engine::services::list``).

Channels (0.25.0 and 0.9.0): a ``produce`` function writes ``data["n"]``
binary chunks of 16 KiB (``sha256(i)`` repeated) and a text message
``{"i": i}`` after each into the channel writer ``data["output"]``, then
closes it; 0.9.0's ``{"op": "channel_read", "fn", "n"}`` creates a channel,
fires ``fn`` with its writer and reads the reader to the end: ``{"size",
"sha256", "messages"}``.

A ``register`` of kind ``returns`` (every version) hosts a function that
answers the command's ``"result"``.

Two ways to drive a script: :func:`command` sends one command to a worker from
:func:`tests.support.start_sdk_worker`; :func:`sdk_worker` starts one with
functions that answer fixed results and their triggers already registered,
and yields a :class:`SdkDriver` (``call`` returns the result or raises
:class:`SdkCallError`; ``wait_events`` waits for the calls its functions got).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from tests.support import SdkWorker, start_sdk_worker

__all__ = [
    "WORKER_041",
    "WORKER_090",
    "WORKER_025",
    "SCRIPTS",
    "VERSIONS",
    "command",
    "produced",
    "SdkCallError",
    "SdkDriver",
    "sdk_worker",
    "wait_registered",
]

WORKER_041 = r"""
import asyncio, json, sys
from iii import III, InitOptions
from iii.triggers import TriggerHandler

def out(prefix, value):
    print(prefix + " " + json.dumps(value), flush=True)

class Provider(TriggerHandler):
    async def register_trigger(self, config):
        out("TRIGGER+", {"id": config.id, "function_id": config.function_id, "config": config.config})
    async def unregister_trigger(self, config):
        out("TRIGGER-", {"id": config.id, "function_id": config.function_id})

def make(kind, fid, result=None):
    async def handler(data):
        print("CALLED " + fid + " " + json.dumps(data), flush=True)
        if kind == "returns":
            return result
        if kind == "slow":
            await asyncio.sleep(60)
        if kind == "fail":
            raise RuntimeError("boom!")
        return {"echo": data, "by": "0.4.1"}
    return handler

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name=sys.argv[2] if len(sys.argv) > 2 else "w041"))
    await iii.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            result = None
            if op == "register":
                iii.register_function(cmd["id"], make(cmd.get("kind", "echo"), cmd["id"], cmd.get("result")))
            elif op == "call":
                result = await iii.trigger(cmd["fn"], cmd.get("data"), timeout=cmd.get("timeout", 15))
            elif op == "void":
                iii.trigger_void(cmd["fn"], cmd.get("data"))
            elif op == "trigger_type":
                iii.register_trigger_type(cmd["id"], "test type", Provider())
            elif op == "trigger":
                iii.register_trigger(cmd["type"], cmd["fn"], cmd.get("config"))
            elif op == "functions":
                result = sorted(f.function_id for f in await iii.list_functions())
            elif op == "workers":
                result = [{"name": w.name, "functions": w.functions} for w in await iii.list_workers()]
            elif op == "service":
                iii.register_service(cmd["id"], cmd.get("description"), cmd.get("parent"))
            elif op == "services":
                result = (await iii.trigger("engine::services::list", {}))["services"]
            out("OK", result)
        except Exception as exc:
            text = str(exc)
            code = "timeout" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) else None
            try:
                body = eval(text, {}) if text.startswith("{") else None
            except Exception:
                body = None
            if isinstance(body, dict):
                code = body.get("code")
                text = body.get("message", text)
            out("ERR", {"code": code, "message": text})

asyncio.run(main())
"""

WORKER_025 = r"""
import hashlib, json, sys, threading, time, warnings
warnings.simplefilter("ignore")
from iii import register_worker, InitOptions, InvocationError, TriggerAction
from iii.triggers import TriggerHandler

PRINT = threading.Lock()  # sync handlers run in the SDK's threads: one line at a time

def out(prefix, value):
    with PRINT:
        print(prefix + " " + json.dumps(value), flush=True)

class Provider(TriggerHandler):
    async def register_trigger(self, config):
        out("TRIGGER+", {"id": config.id, "function_id": config.function_id, "config": config.config})
    async def unregister_trigger(self, config):
        out("TRIGGER-", {"id": config.id, "function_id": config.function_id})

def make(kind, fid, result=None):
    if kind == "produce":
        async def produce(data):
            out = data["output"]
            for i in range(data["n"]):
                await out.write(hashlib.sha256(str(i).encode()).digest() * 512)
                await out.send_message_async(json.dumps({"i": i}))
            await out.close_async()
            return None
        return produce
    def handler(data):
        with PRINT:
            print("CALLED " + fid + " " + json.dumps(data), flush=True)
        if kind == "returns":
            return result
        if kind == "slow":
            time.sleep(60)
        if kind == "fail":
            raise RuntimeError("boom!")
        return {"echo": data, "by": "0.25.0"}
    return handler

iii = register_worker(sys.argv[1], InitOptions(worker_name=sys.argv[2] if len(sys.argv) > 2 else "w025", otel={"enabled": False}))
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        op = cmd["op"]
        result = None
        if op == "register":
            iii.register_function(cmd["id"], make(cmd.get("kind", "echo"), cmd["id"], cmd.get("result")))
        elif op == "call":
            result = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data"), "timeout_ms": int(cmd.get("timeout", 15) * 1000)})
        elif op == "void":
            iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data"), "action": TriggerAction.Void()})
        elif op == "trigger_type":
            iii.register_trigger_type({"id": cmd["id"], "description": "test type"}, Provider())
        elif op == "trigger":
            iii.register_trigger({"type": cmd["type"], "function_id": cmd["fn"], "config": cmd.get("config")})
        elif op == "functions":
            result = sorted(f["function_id"] for f in iii.trigger({"function_id": "engine::functions::list", "payload": {}})["functions"])
        out("OK", result)
    except InvocationError as exc:
        out("ERR", {"code": exc.code, "message": exc.message})
    except Exception as exc:
        out("ERR", {"code": None, "message": repr(exc)})
iii.shutdown()
"""

# 0.9.0 (the SDK Motia 1.0 runs on): ``register_worker`` as in 0.25, but
# functions are registered with ``{"id": ...}``, a sync ``trigger`` from the
# main thread, and an error result raised as ``Exception(str(error_dict))``.
WORKER_090 = r"""
import ast, asyncio, hashlib, json, sys, threading, time
from iii import register_worker, InitOptions, TriggerAction
from iii.triggers import TriggerHandler

PRINT = threading.Lock()  # sync handlers run in the SDK's executor threads

def out(prefix, value):
    with PRINT:
        print(prefix + " " + json.dumps(value), flush=True)

class Provider(TriggerHandler):
    async def register_trigger(self, config):
        out("TRIGGER+", {"id": config.id, "function_id": config.function_id, "config": config.config})
    async def unregister_trigger(self, config):
        out("TRIGGER-", {"id": config.id, "function_id": config.function_id})

def make(kind, fid, result=None):
    if kind == "produce":
        async def produce(data):
            output = data["output"]
            for i in range(data["n"]):
                await output.write(hashlib.sha256(str(i).encode()).digest() * 512)
                await output.send_message_async(json.dumps({"i": i}))
            await output.close_async()
            return None
        return produce
    def handler(data):
        with PRINT:
            print("CALLED " + fid + " " + json.dumps(data), flush=True)
        if kind == "returns":
            return result
        if kind == "slow":
            time.sleep(60)
        if kind == "fail":
            raise RuntimeError("boom!")
        return {"echo": data, "by": "0.9.0"}
    return handler

def error_of(exc):
    text = str(exc)
    if isinstance(exc, TimeoutError):
        return {"code": "timeout", "message": text}
    try:
        body = ast.literal_eval(text) if text.startswith("{") else None
    except Exception:
        body = None
    if isinstance(body, dict):
        return {"code": body.get("code"), "message": body.get("message", text)}
    return {"code": None, "message": repr(exc)}

def channel_read(fn, n):
    channel = iii.create_channel()
    messages = []
    channel.reader.on_message(lambda text: messages.append(json.loads(text)))
    payload = {"output": channel.writer_ref.model_dump(), "n": n}
    iii.trigger({"function_id": fn, "payload": payload, "action": TriggerAction.Void()})
    data = asyncio.run(channel.reader.read_all())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "messages": messages}

iii = register_worker(sys.argv[1], InitOptions(worker_name=sys.argv[2] if len(sys.argv) > 2 else "w090"))
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        op = cmd["op"]
        result = None
        if op == "register":
            iii.register_function({"id": cmd["id"]}, make(cmd.get("kind", "echo"), cmd["id"], cmd.get("result")))
        elif op == "call":
            result = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data"), "timeout_ms": int(cmd.get("timeout", 15) * 1000)})
        elif op == "void":
            iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data"), "action": TriggerAction.Void()})
        elif op == "trigger_type":
            iii.register_trigger_type({"id": cmd["id"], "description": "test type"}, Provider())
        elif op == "trigger":
            iii.register_trigger({"type": cmd["type"], "function_id": cmd["fn"], "config": cmd.get("config")})
        elif op == "functions":
            result = sorted(f.function_id for f in iii.list_functions())
        elif op == "workers":
            result = [{"name": w.name, "functions": w.functions} for w in iii.list_workers()]
        elif op == "service":
            iii.register_service({k: v for k, v in cmd.items() if k != "op"})
        elif op == "services":
            result = iii.trigger({"function_id": "engine::services::list", "payload": {}})["services"]
        elif op == "channel_read":
            result = channel_read(cmd["fn"], cmd["n"])
        out("OK", result)
    except Exception as exc:
        out("ERR", error_of(exc))
iii.shutdown()
"""

SCRIPTS = {"0.4.1": WORKER_041, "0.9.0": WORKER_090, "0.25.0": WORKER_025}
VERSIONS = tuple(SCRIPTS)


def produced(n: int) -> dict[str, object]:
    """What a ``produce`` function of ``n`` chunks writes, as ``channel_read`` reports it."""
    import hashlib

    data = b"".join(hashlib.sha256(str(i).encode()).digest() * 512 for i in range(n))
    return {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "messages": [{"i": i} for i in range(n)],
    }


async def command(worker, timeout: float = 30.0, **cmd):
    """Send one command; return ``("OK", value)`` or ``("ERR", {code, message})``."""
    status, rest = await worker.request(json.dumps(cmd), timeout=timeout)
    return status, json.loads(rest)


class SdkCallError(Exception):
    """The error an SDK reported for a call: ``code`` and ``message`` as it read them."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(body.get("message"))
        self.code: str | None = body.get("code")
        self.message: str = body.get("message") or ""


class SdkDriver:
    """Calls through a running worker script, and the calls its functions got."""

    def __init__(self, worker: SdkWorker):
        self.worker = worker
        self.events: list[tuple[str, Any]] = []  # (function_id, data), in arrival order

    async def request(self, **cmd: Any) -> Any:
        """One command; its ``OK`` value, or :class:`SdkCallError`."""
        status, rest = await self.worker.request(json.dumps(cmd), on_line=self._record)
        if status == "ERR":
            raise SdkCallError(json.loads(rest))
        return json.loads(rest)

    async def call(self, function_id: str, data: Any = None) -> Any:
        return await self.request(op="call", fn=function_id, data=data, timeout=20)

    def _record(self, line: str) -> None:
        if line.startswith("CALLED "):
            _, fid, payload = line.split(" ", 2)
            self.events.append((fid, json.loads(payload)))

    async def wait_events(
        self, count: int, function_id: str | None = None, within: float = 20
    ) -> list[Any]:
        """Wait until ``count`` calls (of ``function_id``, if given) arrived; their data."""

        def matching() -> list[Any]:
            return [d for f, d in self.events if function_id is None or f == function_id]

        with trio.fail_after(within):
            while len(matching()) < count:
                self._record(await self.worker.lines.receive())
        return matching()


@asynccontextmanager
async def sdk_worker(
    version: str,
    url: str,
    *,
    handlers: dict[str, Any] | None = None,
    triggers: list[Any] | None = None,
) -> AsyncIterator[SdkDriver]:
    """A worker of SDK ``version`` on ``url`` hosting ``handlers`` (function id ->
    the result it answers) and ``triggers`` (``[type, function_id, config]``)."""
    async with start_sdk_worker(version, SCRIPTS[version], url=url) as worker:
        await worker.wait_for("READY", timeout=60)
        driver = SdkDriver(worker)
        for function_id, result in (handlers or {}).items():
            await driver.request(op="register", id=function_id, kind="returns", result=result)
        for kind, function_id, config in triggers or []:
            await driver.request(op="trigger", type=kind, fn=function_id, config=config)
        yield driver


async def wait_registered(
    engine: Any, function_ids: list[str], triggers: int = 0, within: float = 20
) -> None:
    """Wait until ``engine`` has the functions and at least ``triggers`` triggers."""
    with trio.fail_after(within):
        while not (
            set(function_ids) <= set(engine.registry.functions)
            and len(engine.registry.triggers) >= triggers
        ):
            await trio.sleep(0.02)
