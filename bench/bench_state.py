"""Benchmark: state::set / state::get from an SDK worker, and stream fan-out latency.

Part 1, state round trips.  For each state backend (memory, file, Redis) an
engine runs as its own process (``python -m iii serve``) and an official SDK
worker (0.4.1, asyncio) calls ``state::set`` then ``state::get`` in a closed
loop: sequentially (one call in flight: the round-trip rate) and with 16
calls in flight.  The baseline, measured in the same run on the same Redis:
raw SET/GET with ``redis-benchmark`` (C, one connection sequential and 16
connections) and with coredis from Python (sequential).  Ratios are printed
against the sequential redis-benchmark figure, and against the engine's own
floor: the same SDK calling a trivial engine function
(``engine::workers::register``) through the same engine.

Part 2, stream fan-out.  One engine process (memory backend); N WebSocket
clients (N = 1, 100, 1000, all in this process) join the same group; a raw
worker calls ``stream::set``; latency is the time from sending the call to the
moment the first / median / last client has the ``create`` event.  The
clients share one trio loop, so the "last" figure includes reading N frames
in Python here.

Run: ``python bench/bench_state.py [--seconds 3] [--sizes 1,100,1000]``
(needs Redis on 127.0.0.1:6379 and redis-benchmark for the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import trio
import yaml
from trio_websocket import open_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _support import reserve_port, sdk_python, wait_for_port  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379"

SDK_SCRIPT = r"""
import asyncio, json, sys, time
from iii import III, InitOptions

SECONDS = float(sys.argv[2])

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name="bench"))
    await iii.connect()
    await asyncio.sleep(0.5)
    for i in range(200):  # warm-up
        await iii.trigger("state::set", {"scope": "bench", "key": f"k{i}", "value": {"i": i}})
    out = {}
    for name, fn, payload in (
        ("set", "state::set", lambda i: {"scope": "bench", "key": f"k{i % 1000}", "value": {"i": i}}),
        ("get", "state::get", lambda i: {"scope": "bench", "key": f"k{i % 200}"}),
        # the engine's floor: a trivial engine function (it only records metadata)
        ("floor", "engine::workers::register", lambda i: {"name": "bench"}),
    ):
        for inflight in (1, 16):
            done = 0
            deadline = time.perf_counter() + SECONDS
            async def loop(offset):
                nonlocal done
                i = offset
                while time.perf_counter() < deadline:
                    await iii.trigger(fn, payload(i))
                    done += 1
                    i += inflight
            start = time.perf_counter()
            await asyncio.gather(*(loop(k) for k in range(inflight)))
            out[f"{name} x{inflight}"] = done / (time.perf_counter() - start)
    print("RESULT " + json.dumps(out), flush=True)
    await iii.shutdown()

asyncio.run(main())
"""


class Engine:
    def __init__(self, directory: Path, modules: list[dict]):
        self.port = reserve_port()
        self.config = directory / f"engine-{self.port}.yaml"
        self.config.write_text(yaml.safe_dump({"port": self.port, "modules": modules}))
        self.log = directory / f"engine-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Engine:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "iii", "serve", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config.parent,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        await wait_for_port(self.port, 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def state_module(kind: str, directory: Path, prefix: str) -> dict:
    if kind == "memory":
        adapter = {"class": "modules::state::adapters::KvStore", "config": {}}
    elif kind == "file":
        adapter = {
            "class": "modules::state::adapters::KvStore",
            "config": {"store_method": "file_based", "file_path": str(directory / "state")},
        }
    else:
        adapter = {
            "class": "modules::state::adapters::RedisAdapter",
            "config": {"redis_url": REDIS_URL, "key_prefix": prefix},
        }
    return {"class": "modules::state::StateModule", "config": {"adapter": adapter}}


async def sdk_round_trips(kind: str, seconds: float, python: Path) -> dict[str, float]:
    prefix = f"iii-bench-{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        script = directory / "worker.py"
        script.write_text(SDK_SCRIPT)
        try:
            async with Engine(directory, [state_module(kind, directory, prefix)]) as engine:
                result = await trio.run_process(
                    [str(python), str(script), f"ws://127.0.0.1:{engine.port}", str(seconds)],
                    capture_stdout=True,
                    check=True,
                    env={**os.environ, "OTEL_ENABLED": "false"},
                )
        finally:
            if kind == "redis":
                subprocess.run(
                    [
                        "sh",
                        "-c",
                        f"redis-cli --scan --pattern '{prefix}*' | xargs -r redis-cli del",
                    ],
                    capture_output=True,
                    check=False,
                )
    for line in result.stdout.decode().splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"worker printed no result: {result.stdout!r}")


def redis_benchmark(clients: int, requests: int) -> dict[str, float]:
    if shutil.which("redis-benchmark") is None:
        return {}
    output = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            "6379",
            "-t",
            "set,get",
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-q",
            "--csv",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rates = {}
    for line in output.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] in ("SET", "GET"):
            rates[f"{cells[0].lower()} x{clients}"] = float(cells[1])
    return rates


async def coredis_round_trips(seconds: float) -> dict[str, float]:
    import coredis

    key = f"iii-bench-{uuid.uuid4().hex[:8]}"
    rates = {}
    async with coredis.Redis.from_url(REDIS_URL) as client:
        for name in ("set", "get"):
            done = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                if name == "set":
                    await client.set(key, b'{"i": 1}')
                else:
                    await client.get(key)
                done += 1
            rates[f"{name} x1"] = done / (time.perf_counter() - start)
        await client.delete([key])
    return rates


# -- stream fan-out --------------------------------------------------------------------


async def fan_out(sizes: list[int], rounds: int) -> dict[int, dict[str, float]]:
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stream_port = reserve_port()
        modules = [
            {
                "class": "modules::stream::StreamModule",
                "config": {"port": stream_port, "host": "127.0.0.1"},
            }
        ]
        async with Engine(Path(tmp), modules) as engine:
            await wait_for_port(stream_port, 30)
            for size in sizes:
                results[size] = await _fan_out_one(engine.port, stream_port, size, rounds)
    return results


async def _fan_out_one(
    engine_port: int, stream_port: int, size: int, rounds: int
) -> dict[str, float]:
    group = f"g{size}"
    arrivals: list[float] = []
    all_joined = trio.Event()
    joined = 0
    got_round: list[int] = [0]
    round_done = trio.Event()

    async def client(index: int) -> None:
        nonlocal joined, round_done
        async with open_websocket("127.0.0.1", stream_port, "/", use_ssl=False) as ws:
            await ws.send_message(
                orjson.dumps(
                    {
                        "type": "join",
                        "data": {
                            "subscriptionId": str(index),
                            "streamName": "bench",
                            "groupId": group,
                        },
                    }
                ).decode()
            )
            await ws.get_message()  # sync
            joined += 1
            if joined == size:
                all_joined.set()
            while True:
                message = orjson.loads(await ws.get_message())
                if message["event"]["type"] == "create":
                    arrivals.append(time.perf_counter())
                    got_round[0] += 1
                    if got_round[0] == size:
                        round_done.set()

    latencies: dict[str, list[float]] = {"first": [], "median": [], "last": []}
    async with trio.open_nursery() as nursery:
        for index in range(size):
            nursery.start_soon(client, index)
            if index % 50 == 49:
                await trio.sleep(0.05)  # do not overrun the listen backlog
        with trio.fail_after(120):
            await all_joined.wait()
        async with open_websocket("127.0.0.1", engine_port, "/", use_ssl=False) as worker:
            await worker.get_message()  # workerregistered
            for round_index in range(rounds):
                arrivals.clear()
                got_round[0] = 0
                round_done = trio.Event()
                start = time.perf_counter()
                await worker.send_message(
                    orjson.dumps(
                        {
                            "type": "invokefunction",
                            "function_id": "stream::set",
                            "invocation_id": str(uuid.uuid4()),
                            "data": {
                                "stream_name": "bench",
                                "group_id": group,
                                "item_id": f"i{round_index}",
                                "data": {"n": round_index},
                            },
                        }
                    ).decode()
                )
                with trio.fail_after(60):
                    await round_done.wait()
                await worker.get_message()  # the set's result
                times = sorted(t - start for t in arrivals)
                latencies["first"].append(times[0])
                latencies["median"].append(times[len(times) // 2])
                latencies["last"].append(times[-1])
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return {name: statistics.median(values) * 1000 for name, values in latencies.items()}


async def main(seconds: float, sizes: list[int], rounds: int) -> None:
    python = await trio.to_thread.run_sync(sdk_python, "0.4.1")
    print(f"state round trips, {seconds:g} s per measurement (calls/s)")
    baseline = redis_benchmark(1, 20000)
    baseline.update({k.replace("x16", "x16"): v for k, v in redis_benchmark(16, 50000).items()})
    py_redis = await coredis_round_trips(seconds)
    rows = {"redis-benchmark (raw Redis, C)": baseline, "coredis (raw Redis, Python)": py_redis}
    for kind in ("memory", "file", "redis"):
        rows[f"SDK 0.4.1 -> engine, state on {kind}"] = await sdk_round_trips(kind, seconds, python)
    columns = ["set x1", "get x1", "set x16", "get x16", "floor x1", "floor x16"]
    reference = baseline.get("set x1"), baseline.get("get x1")
    print(
        f"{'':40}"
        + "".join(f"{c:>10}" for c in columns)
        + "  set/raw  get/raw  set/floor  get/floor (x1)"
    )
    for name, rates in rows.items():
        cells = "".join(f"{rates[c]:>10.0f}" if c in rates else f"{'-':>10}" for c in columns)
        ratio = ""
        if reference[0] and "set x1" in rates:
            ratio = (
                f"  {rates['set x1'] / reference[0]:>7.3f}  {rates['get x1'] / reference[1]:>7.3f}"
            )
        if "floor x1" in rates:
            ratio += f"  {rates['set x1'] / rates['floor x1']:>9.2f}  {rates['get x1'] / rates['floor x1']:>9.2f}"
        print(f"{name:40}{cells}{ratio}")
    print()
    print(f"stream fan-out: one stream::set -> N clients, median of {rounds} rounds (ms)")
    print(f"{'N':>6}{'first':>10}{'median':>10}{'last':>10}")
    for size, figures in (await fan_out(sizes, rounds)).items():
        print(
            f"{size:>6}{figures['first']:>10.2f}{figures['median']:>10.2f}{figures['last']:>10.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sizes", default="1,100,1000")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    trio.run(main, args.seconds, [int(s) for s in args.sizes.split(",")], args.rounds)
