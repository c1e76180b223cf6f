"""Benchmark: a cluster of engines on one Redis, measured in one run.

1. **Local vs peer call.**  Two engine processes A and B form a cluster
   (``cluster:`` on the local Redis).  A worker connected to B registers
   ``bench::echo``.  The same caller process (asyncio + ``websockets``, as in
   ``bench_core.py``) calls it once through B (*local*: caller -> B ->
   worker) and once through A (*forwarded*: caller -> A -> link -> B ->
   worker).  Reported per path: sequential round trip p50/p99 (one caller,
   ``--calls`` calls), throughput with 8 concurrent callers for
   ``--seconds``, and the CPU time per call of each engine process (from
   /proc), i.e. the cost of each hop.  Local and forwarded alternate for
   ``--rounds`` rounds; each figure is the median over the rounds.
   Target: forwarded p50 <= 1.6x local p50.

2. **REST throughput, ``--processes 1`` vs ``--processes 2``.**  ``python -m
   iii serve --processes N`` with the REST module and a raw worker (the same
   asyncio client) serving ``GET /bench/hello``; ``wrk`` (or the builtin h11
   load of ``bench_rest.py``) with 32 connections on the shared REST port.
   With 2 processes the worker is connected to one of them, so about half
   the requests arrive at the other and are forwarded.  On this 2-core
   machine two engines, the worker and the load generator share two cores:
   the figure shows the overhead, not the gain N cores would give (see the
   CPU per call for that).

Run: ``python bench/bench_cluster.py [--seconds 5] [--calls 2000] [--rounds 3]``
(needs Redis on 127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_core import free_port, wait_port  # noqa: E402
from bench_rest import run_builtin, run_wrk, wait_until  # noqa: E402

FUNCTION = "bench::echo"
TOKEN_ENV = "III_BENCH_CLUSTER_TOKEN"
REDIS = "redis://127.0.0.1:6379"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU of a process and its children (the supervisor's engines)."""
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += tree_cpu(int(entry.name))
        except OSError:
            pass
    return total


# -- the client processes (asyncio + websockets, as the SDKs) ------------------------------


async def run_worker(url: str, route: str | None) -> None:
    import websockets

    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # workerregistered
        await ws.send(orjson.dumps({"type": "registerfunction", "id": FUNCTION}).decode())
        if route is not None:
            await ws.send(
                orjson.dumps(
                    {
                        "type": "registertrigger",
                        "id": str(uuid.uuid4()),
                        "trigger_type": "http",
                        "function_id": FUNCTION,
                        "config": {"api_path": route, "http_method": "GET"},
                    }
                ).decode()
            )
        print("READY", flush=True)
        async for frame in ws:
            message = orjson.loads(frame)
            if message.get("type") != "invokefunction" or not message.get("invocation_id"):
                continue
            await ws.send(
                orjson.dumps(
                    {
                        "type": "invocationresult",
                        "invocation_id": message["invocation_id"],
                        "function_id": message["function_id"],
                        "result": {"status_code": 200, "body": {"ok": True}},
                    }
                ).decode()
            )


async def run_callers(url: str, callers: int, seconds: float, calls: int, pids: list[int]) -> None:
    import websockets

    loop = asyncio.get_running_loop()
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # workerregistered
        waiting: dict[str, asyncio.Future[None]] = {}

        async def reader() -> None:
            async for frame in ws:
                message = orjson.loads(frame)
                future = waiting.pop(message.get("invocation_id"), None)
                if future is not None:
                    if message.get("error"):
                        future.set_exception(RuntimeError(str(message["error"])))
                    else:
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
        await caller(loop.time() + 60, 100, [], [])  # warm up
        latencies: list[float] = []
        counts: list[int] = []
        before = [cpu_seconds(pid) for pid in pids]
        started = time.perf_counter()
        deadline = loop.time() + (seconds if not calls else 600)
        await asyncio.gather(*(caller(deadline, calls, latencies, counts) for _ in range(callers)))
        elapsed = time.perf_counter() - started
        cpu = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
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
                "cpu_us_per_call": [1e6 * c / total for c in cpu],
            }
        ),
        flush=True,
    )


# -- orchestration ---------------------------------------------------------------------------


def write_config(
    path: Path, *, port: int, name: str, rest_port: int | None = None, processes: int | None = None
) -> None:
    prefix = f"bench-{name}:"
    lines = [
        f"port: {port}",
        "cluster:",
        f"  name: {name}",
        f"  redis_url: {REDIS}",
        f"  token_env: {TOKEN_ENV}",
        "modules:",
    ]
    if processes is not None:
        lines.insert(1, f"processes: {processes}")
    if rest_port is not None:
        lines += [
            "  - class: modules::api::RestApiModule",
            f"    config: {{port: {rest_port}, host: 127.0.0.1}}",
        ]
    for module, adapter in (
        ("modules::state::StateModule", "modules::state::adapters::RedisAdapter"),
        ("modules::pubsub::PubSubModule", "modules::pubsub::RedisAdapter"),
    ):
        lines += [
            f"  - class: {module}",
            f"    config: {{adapter: {{class: {adapter}, config: {{redis_url: {REDIS}, key_prefix: '{prefix}'}}}}}}",
        ]
    path.write_text("\n".join(lines) + "\n")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), TOKEN_ENV: "bench-cluster-token-0123456789"}


def start_engine(config: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "iii", "--log-level", "warning", "serve", "-c", str(config)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, timeout=60)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_worker(url: str, route: str | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, __file__, "worker", url] + ([route] if route else [])
    worker = subprocess.Popen(args, stdout=subprocess.PIPE, env=env())
    assert worker.stdout is not None
    if worker.stdout.readline().strip() != b"READY":
        raise RuntimeError("the bench worker did not start")
    return worker


def callers(url: str, count: int, seconds: float, calls: int, pids: list[int]) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "callers",
            url,
            str(count),
            str(seconds),
            str(calls),
            ",".join(map(str, pids)),
        ],
        capture_output=True,
        env=env(),
        check=True,
    )
    return json.loads(out.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def wait_visible(url_port: int, timeout: float = 30) -> None:
    """Until a call of the function through this engine succeeds."""
    import trio

    from iii.client import ClientError, Endpoint, call_function

    async def probe() -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    await call_function(
                        Endpoint.parse(f"ws://127.0.0.1:{url_port}"), FUNCTION, {}, timeout=5
                    )
                    return
                except ClientError:
                    await trio.sleep(0.1)

    trio.run(probe)


def calls_part(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, object]]]:
    name = f"bench{uuid.uuid4().hex[:6]}"
    port_a, port_b = free_port(), free_port()
    write_config(workdir / "a.yaml", port=port_a, name=name)
    write_config(workdir / "b.yaml", port=port_b, name=name)
    a = start_engine(workdir / "a.yaml", port_a)
    b = start_engine(workdir / "b.yaml", port_b)
    worker = start_worker(f"ws://127.0.0.1:{port_b}/")
    rows: dict[str, list[dict[str, object]]] = {}
    try:
        wait_visible(port_a)
        for _ in range(args.rounds):
            for path, port in (("local", port_b), ("forwarded", port_a)):
                url = f"ws://127.0.0.1:{port}/"
                seq = callers(url, 1, args.seconds, args.calls, [a.pid, b.pid])
                c8 = callers(url, 8, args.seconds, 0, [a.pid, b.pid])
                rows.setdefault(path, []).append({"sequential": seq, "c8": c8})
    finally:
        worker.kill()
        worker.wait()
        stop(a)
        stop(b)
    return rows


def rest_part(args: argparse.Namespace, workdir: Path) -> dict[int, list[dict[str, float]]]:
    load = run_wrk if shutil.which("wrk") and args.load != "builtin" else run_builtin
    rows: dict[int, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for processes in (1, 2):
            name = f"benchrest{uuid.uuid4().hex[:6]}"
            port, rest_port = free_port(), free_port()
            config = workdir / f"rest{processes}.yaml"
            write_config(config, port=port, name=name, rest_port=rest_port, processes=processes)
            engine = start_engine(config, port)
            worker = start_worker(f"ws://127.0.0.1:{port}/", "/bench/hello")
            try:
                url = f"http://127.0.0.1:{rest_port}/bench/hello"
                # Every process serves the route (requests spread across them).
                for _ in range(20):
                    wait_until(url, 200)
                time.sleep(1.0)
                before = tree_cpu(engine.pid)
                row = load(url, 32, args.seconds, 200)
                row["engines_cpu_us"] = (
                    1e6 * (tree_cpu(engine.pid) - before) / (row["rps"] * args.seconds)
                )
                rows.setdefault(processes, []).append(row)
            finally:
                worker.kill()
                worker.wait()
                stop(engine)
    return rows


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        asyncio.run(run_worker(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "callers":
        pids = [int(p) for p in sys.argv[6].split(",")]
        asyncio.run(
            run_callers(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), pids)
        )
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", choices=("wrk", "builtin"), default="wrk")
    parser.add_argument("--skip-rest", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        calls = calls_part(args, workdir)
        rest = {} if args.skip_rest else rest_part(args, workdir)

    def pick(path: str, scenario: str, key: str, index: int | None = None) -> float:
        values = []
        for row in calls[path]:
            value = row[scenario][key]  # type: ignore[index]
            values.append(value[index] if index is not None else value)
        return median(values)

    print(
        f"cluster bench: {args.rounds} rounds, {args.calls} sequential calls, {args.seconds:g}s per load step"
    )
    print("calls (worker on engine B; CPU per call of engine A / engine B):")
    print(
        f"  {'path':10} {'p50 ms':>8} {'p99 ms':>8} {'c8 calls/s':>11} {'A us/call':>10} {'B us/call':>10}"
    )
    for path in ("local", "forwarded"):
        print(
            f"  {path:10} {pick(path, 'sequential', 'p50_ms'):8.3f} {pick(path, 'sequential', 'p99_ms'):8.3f}"
            f" {pick(path, 'c8', 'throughput'):11.0f} {pick(path, 'c8', 'cpu_us_per_call', 0):10.1f}"
            f" {pick(path, 'c8', 'cpu_us_per_call', 1):10.1f}"
        )
    ratios = [
        f["sequential"]["p50_ms"] / loc["sequential"]["p50_ms"]  # type: ignore[index,operator]
        for loc, f in zip(calls["local"], calls["forwarded"], strict=True)
    ]
    print(
        f"  forwarded/local p50: {median(ratios):.2f} (target <= 1.6); per round: {', '.join(f'{r:.2f}' for r in ratios)}"
    )
    if rest:
        print("REST GET /bench/hello, 32 connections (all engine processes' CPU per request):")
        for processes, rows in rest.items():
            print(
                f"  --processes {processes}: {median([r['rps'] for r in rows]):8.0f} req/s"
                f"  p50 {median([r['p50_ms'] for r in rows]):6.2f} ms  p99 {median([r['p99_ms'] for r in rows]):6.2f} ms"
                f"  engines {median([r['engines_cpu_us'] for r in rows]):6.0f} us/req"
                f"  non-200 {sum(int(r['unexpected']) for r in rows)}"
            )


if __name__ == "__main__":
    main()
