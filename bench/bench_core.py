"""Benchmark: invocation routing through the engine vs a minimal relay, in one run.

The *minimal relay* is a trio-websocket server that forwards
``invokefunction`` / ``invocationresult`` between two connections by
dictionary lookup with orjson and nothing else: the floor for any engine built
on the same WebSocket stack.  Both servers run as their own process and are
driven by the same clients:

* a worker process that registers ``bench::echo`` and answers every call;
* a caller process with one connection shared by N concurrent callers, each
  calling in a closed loop (as an SDK worker shares its socket between
  concurrent ``trigger`` calls), writes batched like the worker's.

Measured per server: sequential round trip p50/p99 (one caller), and
throughput with 1, 8 and 64 concurrent callers.  Printed side by side with the
ratio engine/relay.

Run: ``python bench/bench_core.py [--seconds 5] [--calls 3000]``.
"""

from __future__ import annotations

import argparse
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
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iii.wsio import send_frames  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FUNCTION = "bench::echo"


# -- the minimal relay ------------------------------------------------------------


async def run_relay(port: int) -> None:
    functions: dict[str, object] = {}
    pending: dict[str, object] = {}

    async def handler(request):  # type: ignore[no-untyped-def]
        ws = await request.accept()
        await ws.send_message(orjson.dumps({"type": "workerregistered", "worker_id": str(uuid.uuid4())}).decode())
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

    await serve_websocket(handler, "127.0.0.1", port, None, max_message_size=64 * 1024 * 1024)


# -- clients ------------------------------------------------------------------------


async def run_worker(url: str) -> None:
    async with open_websocket_url(url, message_queue_size=256) as ws:
        await ws.get_message()  # workerregistered
        await ws.send_message(orjson.dumps({"type": "registerfunction", "id": FUNCTION}).decode())
        print("READY", flush=True)
        while True:
            frames = [await ws.get_message()]
            # Answer everything already received in one write (bench client only:
            # it reads trio-websocket's queue directly).
            while True:
                try:
                    frames.append(ws._recv_channel.receive_nowait())
                except trio.WouldBlock:
                    break
            replies: list[str | bytes] = []
            for frame in frames:
                message = orjson.loads(frame)
                if message.get("type") != "invokefunction":
                    continue
                replies.append(
                    orjson.dumps(
                        {
                            "type": "invocationresult",
                            "invocation_id": message["invocation_id"],
                            "function_id": message["function_id"],
                            "result": {"ok": True, "n": message["data"].get("n")},
                        }
                    ).decode()
                )
            if replies:
                await send_frames(ws, replies)


class CallerConnection:
    """One client connection shared by many concurrent callers, as an SDK
    worker shares its socket between concurrent ``trigger`` calls."""

    def __init__(self, ws) -> None:  # type: ignore[no-untyped-def]
        self.ws = ws
        self.waiting: dict[str, trio.Event] = {}
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[str](10_000)

    async def reader(self) -> None:
        while True:
            reply = orjson.loads(await self.ws.get_message())
            event = self.waiting.pop(reply.get("invocation_id"), None)
            if event is not None:
                event.set()

    async def writer(self) -> None:
        while True:
            batch = [await self.outbox_receive.receive()]
            while True:
                try:
                    batch.append(self.outbox_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await send_frames(self.ws, batch)

    async def call(self, n: int) -> None:
        invocation_id = str(uuid.uuid4())
        done = self.waiting[invocation_id] = trio.Event()
        await self.outbox_send.send(
            orjson.dumps(
                {"type": "invokefunction", "function_id": FUNCTION, "data": {"n": n}, "invocation_id": invocation_id}
            ).decode()
        )
        await done.wait()


async def _caller_loop(
    connection: CallerConnection, deadline: float, latencies: list[float], counts: list[int], limit: int | None
) -> None:
    n = 0
    while trio.current_time() < deadline and (limit is None or n < limit):
        started = time.perf_counter()
        await connection.call(n)
        latencies.append(time.perf_counter() - started)
        n += 1
    counts.append(n)


async def run_callers(url: str, callers: int, seconds: float, calls: int | None) -> None:
    latencies: list[float] = []
    counts: list[int] = []
    async with open_websocket_url(url, message_queue_size=256) as ws:
        await ws.get_message()  # workerregistered
        connection = CallerConnection(ws)
        async with trio.open_nursery() as background:
            background.start_soon(connection.reader)
            background.start_soon(connection.writer)
            await _caller_loop(connection, trio.current_time() + 60, [], [], 50)  # warm up
            deadline = trio.current_time() + seconds
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(_caller_loop, connection, deadline, latencies, counts, calls)
            elapsed = time.perf_counter() - started
            background.cancel_scope.cancel()
    latencies.sort()
    print(
        json.dumps(
            {
                "calls": sum(counts),
                "seconds": elapsed,
                "throughput": sum(counts) / elapsed,
                "p50_ms": 1000 * statistics.median(latencies),
                "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
            }
        ),
        flush=True,
    )


# -- orchestration ----------------------------------------------------------------------


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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, __file__, "worker", url], stdout=subprocess.PIPE, env=env)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == b"READY"
        time.sleep(0.2)
        results = {}
        scenarios = [("sequential", 1, calls), ("c1", 1, None), ("c8", 8, None), ("c64", 64, None)]
        for name, callers, limit in scenarios:
            out = subprocess.run(
                [sys.executable, __file__, "callers", url, str(callers), str(seconds if limit is None else 120), str(limit or 0)],
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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        trio.run(run_relay, int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        trio.run(run_worker, sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "callers":
        limit = int(sys.argv[5]) or None
        trio.run(run_callers, sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), limit)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        relay = measure("relay", args.seconds, args.calls, Path(tmp))
        engine = measure("engine", args.seconds, args.calls, Path(tmp))
    print(f"{'':28}{'relay':>12}{'engine':>12}{'engine/relay':>14}")
    seq_r, seq_e = relay["sequential"], engine["sequential"]
    for label, key in (("sequential p50 (ms)", "p50_ms"), ("sequential p99 (ms)", "p99_ms")):
        print(f"{label:28}{seq_r[key]:12.3f}{seq_e[key]:12.3f}{seq_e[key] / seq_r[key]:14.2f}")
    for name, label in (("c1", "1 caller"), ("c8", "8 callers"), ("c64", "64 callers")):
        r, e = relay[name]["throughput"], engine[name]["throughput"]
        print(f"{'throughput ' + label + ' (/s)':28}{r:12.0f}{e:12.0f}{e / r:14.2f}")


if __name__ == "__main__":
    main()
