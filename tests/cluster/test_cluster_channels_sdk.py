"""Channels between official SDK workers (0.25.0) on two engine processes.

Whichever engine made the channel (a worker's ``engine::channels::create``),
wherever its ref sits in the value (nested in a call's data, or in a result)
and whichever way the bytes go, a worker on one engine streams to a worker
on the other.  Each direction is run from both engines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.cluster.processes import engine_processes, wait_function
from tests.sdk_workers import command
from tests.support import start_sdk_worker

pytestmark = [pytest.mark.sdk, pytest.mark.services]

# Functions (``register`` with ``kind``), each finding its channel anywhere in its data:
# ``produce`` writes ``n`` chunks into a writer; ``consume`` reads a reader to the end;
# ``offer`` makes a channel, writes ``n`` chunks into it in the background and returns
# its reader ref nested in the result; ``sink`` makes one, returns its writer ref and
# prints ``SUNK <digest>`` once it has read it to the end.
# Commands: ``send`` (make a channel, call ``fn`` with its reader ref nested in the
# data, write ``n`` chunks), ``recv`` (the writer ref nested; read), ``fetch`` (call,
# read the result's reader ref), ``push`` (call, write ``n`` chunks into the result's
# writer ref).  Each answers a digest ``{"size", "sha256"}`` (and the call's result).
CHANNEL_WORKER = r"""
import asyncio, hashlib, json, sys, threading, warnings
warnings.simplefilter("ignore")
from iii import register_worker, InitOptions
from iii.helpers import create_channel, create_channel_async
from iii.channels import ChannelReader, ChannelWriter
from iii.iii_types import StreamChannelRef

PRINT = threading.Lock()
BACKGROUND = []

def out(prefix, value):
    with PRINT:
        print(prefix + " " + json.dumps(value), flush=True)

def chunk(i):
    return hashlib.sha256(str(i).encode()).digest() * 512

def digest(blob):
    return {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

async def write_all(writer, n):
    for i in range(n):
        await writer.write(chunk(i))
    await writer.close_async()

def find(value, cls):
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = find(item, cls)
            if found is not None:
                return found
    return None

def make(kind):
    async def produce(data):
        await write_all(find(data, ChannelWriter), data["n"])
        return {"wrote": data["n"]}
    async def consume(data):
        return digest(await find(data, ChannelReader).read_all())
    async def offer(data):
        channel = await create_channel_async(iii)
        BACKGROUND.append(asyncio.get_running_loop().create_task(write_all(channel.writer, data["n"])))
        return {"stream": [{"reader": channel.reader_ref.model_dump()}]}
    async def sink(data):
        channel = await create_channel_async(iii)
        async def drain():
            out("SUNK", digest(await channel.reader.read_all()))
        BACKGROUND.append(asyncio.get_running_loop().create_task(drain()))
        return {"into": {"writer": channel.writer_ref.model_dump()}}
    return {"produce": produce, "consume": consume, "offer": offer, "sink": sink}[kind]

def call(fn, payload):
    return iii.trigger({"function_id": fn, "payload": payload, "timeout_ms": 30000})

async def send(fn, n):
    channel = create_channel(iii)
    payload = {"deep": [{"input": channel.reader_ref.model_dump(), "tag": "x"}]}
    result, _ = await asyncio.gather(asyncio.to_thread(call, fn, payload), write_all(channel.writer, n))
    return result

async def recv(fn, n):
    channel = create_channel(iii)
    payload = {"io": {"output": channel.writer_ref.model_dump()}, "n": n}
    result, blob = await asyncio.gather(asyncio.to_thread(call, fn, payload), channel.reader.read_all())
    return {"result": result, "got": digest(blob)}

async def fetch(fn, n):
    result = await asyncio.to_thread(call, fn, {"n": n})
    ref = StreamChannelRef(**result["stream"][0]["reader"])
    return digest(await ChannelReader(sys.argv[1], ref).read_all())

async def push(fn, n):
    result = await asyncio.to_thread(call, fn, {})
    await write_all(ChannelWriter(sys.argv[1], StreamChannelRef(**result["into"]["writer"])), n)
    return None

iii = register_worker(sys.argv[1], InitOptions(worker_name=sys.argv[2], otel={"enabled": False}))
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        op = cmd["op"]
        if op == "register":
            iii.register_function(cmd["id"], make(cmd["kind"]))
            result = None
        else:
            result = asyncio.run({"send": send, "recv": recv, "fetch": fetch, "push": push}[op](cmd["fn"], cmd["n"]))
        out("OK", result)
    except Exception as exc:
        out("ERR", {"code": getattr(exc, "code", None), "message": repr(exc)})
iii.shutdown()
"""

KINDS = ("produce", "consume", "offer", "sink")


def digest(n: int) -> dict[str, object]:
    blob = b"".join(hashlib.sha256(str(i).encode()).digest() * 512 for i in range(n))
    return {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


async def test_sdk_workers_on_two_engines_stream_through_each_others_channels(
    tmp_path: Path,
) -> None:
    n = 64  # 64 x 16 KiB = 1 MiB each way
    async with engine_processes(tmp_path, 2) as (a, b):
        async with (
            start_sdk_worker("0.25.0", CHANNEL_WORKER, url=a.url, args=("on-a",)) as on_a,
            start_sdk_worker("0.25.0", CHANNEL_WORKER, url=b.url, args=("on-b",)) as on_b,
        ):
            for worker, prefix in ((on_a, "a"), (on_b, "b")):
                await worker.wait_for("READY", timeout=60)
                for kind in KINDS:
                    assert await command(
                        worker, op="register", id=f"{prefix}::{kind}", kind=kind
                    ) == (
                        "OK",
                        None,
                    )
            for engine in (a, b):
                for prefix in ("a", "b"):
                    for kind in KINDS:
                        await wait_function(engine, f"{prefix}::{kind}")
            # Each worker drives the other's functions: the channels are made on
            # the caller's engine (send, recv) or on the callee's (fetch, push).
            for caller, callee, other in ((on_a, "b", on_b), (on_b, "a", on_a)):
                assert await command(caller, op="send", fn=f"{callee}::consume", n=n) == (
                    "OK",
                    digest(n),
                )
                status, value = await command(caller, op="recv", fn=f"{callee}::produce", n=n)
                assert (status, value) == ("OK", {"result": {"wrote": n}, "got": digest(n)})
                assert await command(caller, op="fetch", fn=f"{callee}::offer", n=n) == (
                    "OK",
                    digest(n),
                )
                assert await command(caller, op="push", fn=f"{callee}::sink", n=n) == ("OK", None)
                line = await other.wait_for("SUNK", timeout=30)
                assert json.loads(line.partition(" ")[2]) == digest(n)
