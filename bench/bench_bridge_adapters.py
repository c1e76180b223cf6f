"""Benchmark: what a Bridge adapter costs against calling the backend engine directly.

Two engine processes (``python -m iii serve``): a **backend** with State on
KvStore (memory) and the builtin queue (memory), and a **bridge** engine whose
State and Queue modules run on the Bridge adapters pointed at the backend.
Workers are raw WebSocket clients in this process (one trio loop).

Part 1, state round trips: ``state::set`` then ``state::get`` in a closed
loop for ``--seconds``, from 1 connection (one call in flight: the round-trip
rate) and from 16 connections, against the backend directly (the baseline)
and through the bridge engine (one extra hop over the adapter's link).

Part 2, queue: ``--jobs`` jobs enqueued (16 enqueuers in parallel) on a topic
whose ``queue`` trigger is a raw worker answering at once; the time from the
first enqueue until every job has been handled, with the worker on the
backend (baseline) and on the bridge engine (jobs stored on the backend,
handed over the link to the bridge engine's worker).

Run: ``python bench/bench_bridge_adapters.py [--seconds 3] [--jobs 2000]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection, open_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _support import EngineProcess  # noqa: E402

from iii.client import client_metadata  # noqa: E402


def backend_config() -> dict[str, Any]:
    return {
        "modules": [
            {"class": "modules::state::StateModule"},
            {"class": "modules::pubsub::PubSubModule"},
            {"class": "modules::queue::QueueModule"},
        ]
    }


def bridge_config(url: str) -> dict[str, Any]:
    bridge = {"bridge_url": url}
    return {
        "modules": [
            {
                "class": "modules::state::StateModule",
                "config": {
                    "adapter": {"class": "modules::state::adapters::Bridge", "config": bridge}
                },
            },
            {
                "class": "modules::queue::QueueModule",
                "config": {
                    "adapter": {"class": "modules::queue::adapters::Bridge", "config": bridge}
                },
            },
        ]
    }


async def connect(port: int) -> tuple[Any, WebSocketConnection]:
    manager = open_websocket("127.0.0.1", port, "/", use_ssl=False)
    ws = await manager.__aenter__()
    orjson.loads(await ws.get_message())  # workerregistered
    return manager, ws


async def call(ws: WebSocketConnection, function_id: str, data: Any) -> Any:
    invocation_id = str(uuid.uuid4())
    await ws.send_message(
        orjson.dumps(
            {
                "type": "invokefunction",
                "function_id": function_id,
                "data": data,
                "invocation_id": invocation_id,
            }
        ).decode()
    )
    while True:
        message = orjson.loads(await ws.get_message())
        if message.get("type") == "invocationresult" and message["invocation_id"] == invocation_id:
            if "error" in message:
                raise RuntimeError(f"{function_id}: {message['error']}")
            return message.get("result")


async def state_loop(
    port: int, seconds: float, connections: int, large: bool = False
) -> tuple[float, float]:
    """(set+get pairs per second, median pair latency in ms), after a warm-up.

    ``large``: the workers declare ``large-messages.v1`` (64 MiB frames); else
    they have 1 MiB frames, like a 0.4.1 SDK worker, and the
    Bridge reads the old value before each set (see iii.adapters.state.bridge).
    """
    latencies: list[float] = []
    warm = trio.Semaphore(0)
    go = trio.Event()
    window: dict[str, float] = {}

    async def one(index: int) -> None:
        manager, ws = await connect(port)
        try:
            if large:
                await call(ws, "engine::workers::register", client_metadata("bench"))
            for i in range(20):  # warm-up
                await call(
                    ws, "state::set", {"scope": "bench", "key": f"{index}", "value": {"i": i}}
                )
            warm.release()
            await go.wait()
            while time.perf_counter() < window["end"]:
                started = time.perf_counter()
                await call(
                    ws, "state::set", {"scope": "bench", "key": f"{index}", "value": {"i": 1}}
                )
                await call(ws, "state::get", {"scope": "bench", "key": f"{index}"})
                latencies.append(time.perf_counter() - started)
        finally:
            await manager.__aexit__(None, None, None)

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)
        for _ in range(connections):
            await warm.acquire()
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + seconds
        go.set()
    elapsed = time.perf_counter() - window["start"]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


async def queue_run(enqueue_port: int, handler_port: int, jobs: int) -> float:
    """Seconds from the first enqueue until every job was handled."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    manager, handler = await connect(handler_port)
    done = trio.Event()
    handled = 0
    try:
        await handler.send_message(
            orjson.dumps({"type": "registerfunction", "id": "bench::job"}).decode()
        )
        await handler.send_message(
            orjson.dumps(
                {
                    "type": "registertrigger",
                    "id": topic,
                    "trigger_type": "queue",
                    "function_id": "bench::job",
                    "config": {"topic": topic, "concurrency": 16},
                }
            ).decode()
        )
        await trio.sleep(1.0)  # the trigger reaches the backend (through the link for the bridge)

        async def answer() -> None:
            nonlocal handled
            while True:
                message = orjson.loads(await handler.get_message())
                if message.get("type") != "invokefunction":
                    continue
                await handler.send_message(
                    orjson.dumps(
                        {
                            "type": "invocationresult",
                            "invocation_id": message["invocation_id"],
                            "function_id": message["function_id"],
                            "result": None,
                        }
                    ).decode()
                )
                handled += 1
                if handled == jobs:
                    done.set()

        async def enqueue(share: range) -> None:
            m, ws = await connect(enqueue_port)
            try:
                for n in share:
                    await call(ws, "enqueue", {"topic": topic, "data": {"n": n}})
            finally:
                await m.__aexit__(None, None, None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            started = time.perf_counter()
            async with trio.open_nursery() as enqueuers:
                for k in range(16):
                    enqueuers.start_soon(enqueue, range(k, jobs, 16))
            with trio.fail_after(120):
                await done.wait()
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        return elapsed
    finally:
        await manager.__aexit__(None, None, None)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        backend_dir = Path(directory, "backend")
        bridge_dir = Path(directory, "bridge")
        await trio.Path(backend_dir).mkdir()
        await trio.Path(bridge_dir).mkdir()
        backend = EngineProcess.write(backend_dir, backend_config())
        backend.start()
        try:
            await backend.started()
            bridge = EngineProcess.write(bridge_dir, bridge_config(backend.url))
            bridge.start()
            try:
                await bridge.started()
                await trio.sleep(1.0)
                print("state::set + state::get pairs (raw loopback workers)")
                for connections, large in ((1, False), (1, True), (16, False), (16, True)):
                    direct = await state_loop(backend.port, args.seconds, connections, large)
                    bridged = await state_loop(bridge.port, args.seconds, connections, large)
                    frames = "64 MiB" if large else " 1 MiB"
                    print(
                        f"  {connections:2d} conn, {frames} frames: backend direct"
                        f" {direct[0]:6.0f} pairs/s (median {direct[1]:6.2f} ms) | through the"
                        f" bridge {bridged[0]:6.0f} pairs/s (median {bridged[1]:6.2f} ms)"
                        f" | ratio {bridged[0] / direct[0]:.2f}"
                    )
                print(f"queue: {args.jobs} jobs, 16 enqueuers, handler concurrency 16")
                direct_s = await queue_run(backend.port, backend.port, args.jobs)
                bridged_s = await queue_run(bridge.port, bridge.port, args.jobs)
                print(
                    f"  backend direct {args.jobs / direct_s:8.0f} jobs/s | through the bridge"
                    f" {args.jobs / bridged_s:8.0f} jobs/s | ratio {direct_s / bridged_s:.2f}"
                )
            finally:
                bridge.kill()
        finally:
            backend.kill()


if __name__ == "__main__":
    trio.run(main)
