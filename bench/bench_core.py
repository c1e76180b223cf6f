"""Benchmark: invocation routing through the engine vs a minimal relay, in one run.

The *minimal relay* is a trio-websocket server that forwards
``invokefunction`` / ``invocationresult`` between two connections by
dictionary lookup with orjson and nothing else: the floor for any engine built
on the same WebSocket stack.  Both servers run as their own process and are
driven by the same clients, written on asyncio + ``websockets`` (the library
the Python SDKs use) so that they leave as much of this 2-core machine as
possible to the server under test:

* a worker process that registers ``bench::echo`` and answers every call;
* a caller process with one connection shared by N concurrent callers, each
  calling in a closed loop, as an SDK worker shares its socket between
  concurrent ``trigger`` calls.

Measured per server: sequential round trip p50/p99 (one caller), throughput
with 1, 8 and 64 concurrent callers, and the server's own CPU time per call
(user + system, from ``/proc``), which is much less sensitive to other load
on a shared machine than throughput is.  Relay and engine runs alternate for
``--rounds`` rounds; each figure is the median over the rounds.

Run: ``pip install -e '.[bench]'`` once, then
``python bench/bench_core.py [--seconds 5] [--calls 3000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
FUNCTION = "bench::echo"
SCENARIOS = [("sequential", 1), ("c1", 1), ("c8", 8), ("c64", 64)]


# -- the minimal relay (trio-websocket, as the engine) ----------------------------------


def run_relay(port: int) -> None:
    import trio
    from trio_websocket import ConnectionClosed, serve_websocket

    functions: dict[str, object] = {}
    pending: dict[str, object] = {}

    async def handler(request):  # type: ignore[no-untyped-def]
        ws = await request.accept()
        await ws.send_message(
            orjson.dumps({"type": "workerregistered", "worker_id": str(uuid.uuid4())}).decode()
        )
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed:
                return
            message = orjson.loads(frame)
            kind = message.get("type")
            if kind == "invokefunction":
                target = functions.get(message["function_id"])
                pending[message["invocation_id"]] = ws
                await target.send_message(orjson.dumps(message).decode())  # type: ignore[attr-defined]
            elif kind == "invocationresult":
                caller = pending.pop(message["invocation_id"], None)
                if caller is not None:
                    await caller.send_message(orjson.dumps(message).decode())  # type: ignore[attr-defined]
            elif kind == "registerfunction":
                functions[message["id"]] = ws

    trio.run(
        lambda: serve_websocket(handler, "127.0.0.1", port, None, max_message_size=64 * 1024 * 1024)
    )


# -- clients (asyncio + websockets) --------------------------------------------------------


async def run_worker(url: str) -> None:
    import websockets

    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # workerregistered
        await ws.send(orjson.dumps({"type": "registerfunction", "id": FUNCTION}).decode())
        print("READY", flush=True)
        async for frame in ws:
            message = orjson.loads(frame)
            if message.get("type") != "invokefunction":
                continue
            await ws.send(
                orjson.dumps(
                    {
                        "type": "invocationresult",
                        "invocation_id": message["invocation_id"],
                        "function_id": message["function_id"],
                        "result": {"ok": True, "n": message["data"].get("n")},
                    }
                ).decode()
            )


async def run_callers(url: str, callers: int, seconds: float, calls: int) -> None:
    import websockets

    loop = asyncio.get_running_loop()
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # workerregistered
        waiting: dict[str, asyncio.Future[None]] = {}

        async def reader() -> None:
            async for frame in ws:
                future = waiting.pop(orjson.loads(frame).get("invocation_id"), None)
                if future is not None:
                    future.set_result(None)

        async def caller(
            deadline: float, limit: int, latencies: list[float], counts: list[int]
        ) -> None:
            n = 0
            while loop.time() < deadline and (not limit or n < limit):
                invocation_id = str(uuid.uuid4())
                done = waiting[invocation_id] = loop.create_future()
                started = time.perf_counter()
                await ws.send(
                    orjson.dumps(
                        {
                            "type": "invokefunction",
                            "function_id": FUNCTION,
                            "data": {"n": n},
                            "invocation_id": invocation_id,
                        }
                    ).decode()
                )
                await done
                latencies.append(time.perf_counter() - started)
                n += 1
            counts.append(n)

        read_task = asyncio.create_task(reader())
        await caller(loop.time() + 60, 50, [], [])  # warm up
        latencies: list[float] = []
        counts: list[int] = []
        server_pid = int(os.environ["BENCH_SERVER_PID"])
        cpu_before = _cpu_seconds(server_pid)
        started = time.perf_counter()
        deadline = loop.time() + (seconds if not calls else 600)
        await asyncio.gather(*(caller(deadline, calls, latencies, counts) for _ in range(callers)))
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(server_pid) - cpu_before
        read_task.cancel()
    latencies.sort()
    total = sum(counts)
    print(
        json.dumps(
            {
                "calls": total,
                "throughput": total / elapsed,
                "p50_ms": 1000 * statistics.median(latencies),
                "p99_ms": 1000 * latencies[max(0, int(len(latencies) * 0.99) - 1)],
                "cpu_us_per_call": 1e6 * cpu / total,
            }
        ),
        flush=True,
    )


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- orchestration --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def start_server(kind: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind == "relay":
        cmd = [sys.executable, __file__, "relay", str(port)]
    else:
        config = workdir / "bench.yaml"
        config.write_text(f"port: {port}\nmodules: []\n")
        cmd = [sys.executable, "-m", "iii", "--log-level", "warning", "serve", "-c", str(config)]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return process


def measure(kind: str, seconds: float, calls: int, workdir: Path) -> dict[str, dict[str, float]]:
    port = free_port()
    server = start_server(kind, port, workdir)
    url = f"ws://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_SERVER_PID": str(server.pid)}
    worker = subprocess.Popen(
        [sys.executable, __file__, "worker", url], stdout=subprocess.PIPE, env=env
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == b"READY"
        time.sleep(0.2)
        results = {}
        for name, callers in SCENARIOS:
            limit = calls if name == "sequential" else 0
            out = subprocess.run(
                [sys.executable, __file__, "callers", url, str(callers), str(seconds), str(limit)],
                capture_output=True,
                env=env,
                check=True,
            )
            results[name] = json.loads(out.stdout.decode().strip().splitlines()[-1])
        return results
    finally:
        worker.kill()
        server.kill()
        worker.wait()
        server.wait()


def median_of(rounds: list[dict[str, dict[str, float]]], scenario: str, key: str) -> float:
    return statistics.median(r[scenario][key] for r in rounds)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        run_relay(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        asyncio.run(run_worker(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "callers":
        asyncio.run(
            run_callers(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        )
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    relay_rounds, engine_rounds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            relay_rounds.append(measure("relay", args.seconds, args.calls, Path(tmp)))
            engine_rounds.append(measure("engine", args.seconds, args.calls, Path(tmp)))
    print(f"medians of {args.rounds} alternating rounds; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'':34}{'relay':>10}{'engine':>10}{'engine/relay':>14}")

    def row(label: str, scenario: str, key: str, fmt: str) -> None:
        r, e = median_of(relay_rounds, scenario, key), median_of(engine_rounds, scenario, key)
        print(f"{label:34}{r:10{fmt}}{e:10{fmt}}{e / r:14.2f}")

    row("sequential p50 (ms)", "sequential", "p50_ms", ".3f")
    row("sequential p99 (ms)", "sequential", "p99_ms", ".3f")
    for scenario, label in (("c1", "1 caller"), ("c8", "8 callers"), ("c64", "64 callers")):
        row(f"throughput, {label} (/s)", scenario, "throughput", ".0f")
    for scenario, label in (("c1", "1 caller"), ("c64", "64 callers")):
        row(f"server CPU per call, {label} (us)", scenario, "cpu_us_per_call", ".0f")


if __name__ == "__main__":
    main()
