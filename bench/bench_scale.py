"""Benchmark: the engine at scale — many workers, many replicas, many pending calls.

One engine process (``python -m iii serve``) and one client process on
asyncio + ``websockets`` (as bench_core.py), which in one run measures:

* **engine::functions::list**, **engine::triggers::list** and
  **engine::workers::list**: the median and worst round trip of the call
  with ``--small`` and with ``--large`` items registered (functions, parked
  triggers, connected workers), the engine's CPU and minor page faults per
  call, and the ratio of each pair, which is the item ratio (4 by default)
  when the call is linear; and the engine's idle CPU right after (the
  heartbeats of 4,000 connections; part of the CPU per call if not zero);
* **replicas**: the p50 and p99 of ``bench::echo`` calls at ``--inflight``
  calls in flight (one caller connection), with one replica and then with
  ``--large`` replicas (one per connected worker, all answering);
* **cluster routing**: the CPU to pick a replica on a clustered engine, where
  two of the replicas are peer engines', with few and with ``--large``
  replicas, for a worker's call and for a call a peer forwarded (local
  replicas only), and the ratio of the two sizes (1 when the pick is O(1));
* **memory**: the engine's RSS per connected worker (each with one
  function), and per pending call (``--pending`` calls held by a worker
  that never answers).

``--baseline-python`` runs the same measurements, in the same run, against
the engine another interpreter imports (e.g. the venv of a checkout of the
previous commit), engine and baseline alternating for ``--rounds`` rounds.

Run: ``pip install -e '.[bench]'`` once, then ``python bench/bench_scale.py``
``[--baseline-python ../main/.venv/bin/python] [--rounds 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from _support import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
ECHO = "bench::echo"
HOLD = "bench::hold"
# Peer engines among the replicas in the cluster routing measurement.
PEERS = 2


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# -- the client process (asyncio + websockets) --------------------------------------------


class Conn:
    """One worker connection: answers ``bench::echo``, holds ``bench::hold``, calls."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.held = 0
        self.held_event = asyncio.Event()
        self.hold_target = 0
        self.reader = asyncio.create_task(self.read())

    @classmethod
    async def open(cls, url: str) -> Conn:
        import websockets

        ws = await websockets.connect(url, max_size=None, compression=None, open_timeout=120)
        await ws.recv()  # workerregistered
        return cls(ws)

    async def read(self) -> None:
        import websockets

        try:
            async for frame in self.ws:
                message = orjson.loads(frame)
                kind = message.get("type")
                if kind == "invokefunction":
                    if message["function_id"] == HOLD:
                        self.held += 1
                        if self.held >= self.hold_target:
                            self.held_event.set()
                        continue
                    await self.ws.send(
                        orjson.dumps(
                            {
                                "type": "invocationresult",
                                "invocation_id": message["invocation_id"],
                                "function_id": message["function_id"],
                                "result": message.get("data"),
                            }
                        ).decode()
                    )
                elif kind == "invocationresult":
                    future = self.waiting.pop(message.get("invocation_id"), None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except websockets.ConnectionClosed:
            pass

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def call(self, function_id: str, data: Any = None) -> Any:
        invocation_id = str(uuid.uuid4())
        future = self.waiting[invocation_id] = asyncio.get_running_loop().create_future()
        await self.send(
            {
                "type": "invokefunction",
                "function_id": function_id,
                "data": data,
                "invocation_id": invocation_id,
            }
        )
        message = await asyncio.wait_for(future, 300)
        if message.get("error"):
            raise RuntimeError(f"{function_id}: {message['error']}")
        return message.get("result")

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (Linux /proc)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


async def timed_call(caller: Conn, function_id: str, repeat: int) -> dict[str, Any]:
    """``repeat`` sequential calls: median and worst round trip, the engine's CPU
    and minor page faults per call, and its idle CPU over a window as long
    right after (the heartbeats of every connection: if it is not about
    zero, part of the CPU per call is that background, which grows with the
    workers *and* with the call's duration)."""
    times, result = [], None
    server_pid = int(os.environ["BENCH_SERVER_PID"])
    cpu_before, faults_before = cpu_seconds(server_pid), minor_faults(server_pid)
    started_all = time.perf_counter()
    for _ in range(repeat):
        started = time.perf_counter()
        result = await caller.call(function_id, {})
        times.append(1000 * (time.perf_counter() - started))
    wall = time.perf_counter() - started_all
    cpu = cpu_seconds(server_pid) - cpu_before
    faults = minor_faults(server_pid) - faults_before
    idle_before = cpu_seconds(server_pid)
    idle_started = time.perf_counter()
    await asyncio.sleep(max(wall, 2.0))
    idle_rate = (cpu_seconds(server_pid) - idle_before) / (time.perf_counter() - idle_started)
    items = len(next(iter(result.values())))
    return {
        "items": items,
        "ms": statistics.median(times),
        "max_ms": max(times),
        "cpu_ms": 1000 * cpu / repeat,
        "idle_cpu_ms_per_s": 1000 * idle_rate,
        "faults": faults / repeat,
    }


async def closed_loop(caller: Conn, inflight: int, calls: int) -> dict[str, float]:
    latencies: list[float] = []

    async def one() -> None:
        while len(latencies) < calls:
            started = time.perf_counter()
            await caller.call(ECHO, {"n": 1})
            latencies.append(1000 * (time.perf_counter() - started))

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "calls_per_s": len(latencies) / elapsed,
    }


async def connect_workers(url: str, count: int, into: list[Conn]) -> None:
    """Open ``count`` more workers, each registering ``bench::echo``, 50 at a time."""
    target = len(into) + count
    while len(into) < target:
        batch = await asyncio.gather(*(Conn.open(url) for _ in range(min(50, target - len(into)))))
        for conn in batch:
            await conn.send({"type": "registerfunction", "id": ECHO})
        into.extend(batch)


async def settle(caller: Conn, function_id: str, done: Any) -> Any:
    """Call ``function_id`` until ``done(result)``: registrations are fire-and-forget."""
    for _ in range(600):
        result = await caller.call(function_id, {})
        if done(result):
            return result
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{function_id} never settled")


async def run_clients(
    url: str, small: int, large: int, inflight: int, calls: int, pending: int
) -> None:
    server_pid = int(os.environ["BENCH_SERVER_PID"])
    out: dict[str, Any] = {}
    caller = await Conn.open(url)
    # Frames above 1 MiB only to a worker that says it reads them (the 4,000-worker list).
    await caller.call(
        "engine::workers::register", {"runtime": "python", "features": ["large-messages.v1"]}
    )

    # functions::list and triggers::list with ``small`` then ``large`` items.
    lister = await Conn.open(url)
    for label, count in (("small", small), ("large", large)):
        for i in range(count):
            await lister.send(
                {"type": "registerfunction", "id": f"bench::f{i:05d}", "description": "a function"}
            )
            await lister.send(
                {
                    "type": "registertrigger",
                    "id": f"t{i:05d}",
                    "trigger_type": "bench::parked",  # nobody provides it: parked, still listed
                    "function_id": f"bench::f{i:05d}",
                    "config": {"n": i},
                }
            )
        await settle(caller, "engine::functions::list", lambda r, c=count: len(r["functions"]) >= c)
        await settle(caller, "engine::triggers::list", lambda r, c=count: len(r["triggers"]) >= c)
        out[f"functions_list_{label}"] = await timed_call(caller, "engine::functions::list", 40)
        out[f"triggers_list_{label}"] = await timed_call(caller, "engine::triggers::list", 40)
    await lister.close()
    await settle(caller, "engine::functions::list", lambda r: len(r["functions"]) == 0)

    # Replicas: one, then ``large``; workers::list and RSS per worker on the way.
    workers: list[Conn] = []
    rss_before = rss_bytes(server_pid)
    await connect_workers(url, 1, workers)

    def echo_replicas(result: Any) -> int:
        return sum(1 for w in result["workers"] if ECHO in w["functions"])

    await settle(caller, "engine::workers::list", lambda r: echo_replicas(r) == 1)
    await closed_loop(caller, inflight, min(500, calls))  # warm up
    out["replicas_1"] = await closed_loop(caller, inflight, calls)
    for label, count in (("small", small), ("large", large)):
        await connect_workers(url, count - len(workers), workers)
        await settle(caller, "engine::workers::list", lambda r, c=count: echo_replicas(r) == c)
        out[f"workers_list_{label}"] = await timed_call(caller, "engine::workers::list", 40)
    out["rss_per_worker_kib"] = (rss_bytes(server_pid) - rss_before) / 1024 / len(workers)
    await closed_loop(caller, inflight, min(500, calls))
    out[f"replicas_{len(workers)}"] = await closed_loop(caller, inflight, calls)
    out["replicas_large_count"] = len(workers)

    # Pending calls: ``pending`` calls held by a worker that never answers.
    holder = await Conn.open(url)
    await holder.send({"type": "registerfunction", "id": HOLD})
    await settle(
        caller,
        "engine::functions::list",
        lambda r: any(f["function_id"] == HOLD for f in r["functions"]),
    )
    holder.hold_target = pending
    rss_before = rss_bytes(server_pid)
    held_calls = [asyncio.create_task(caller.call(HOLD, {"n": i})) for i in range(pending)]
    await asyncio.wait_for(holder.held_event.wait(), 300)
    out["rss_per_pending_call_bytes"] = (rss_bytes(server_pid) - rss_before) / pending
    out["pending_calls"] = pending
    await holder.close()  # every held call ends invocation_stopped
    await asyncio.gather(*held_calls, return_exceptions=True)
    out["engine_rss_mib"] = rss_bytes(server_pid) / 2**20
    print(json.dumps(out), flush=True)


# -- routing alone, in-process ---------------------------------------------------------------


def routing_cost(replicas: int, calls: int, inflight: int) -> float:
    """Microseconds of CPU to pick a replica and file then discard the call, ``inflight`` open.

    Only the registry and the pending table, as ``Engine.invoke`` uses them
    (either the current API or the one before ``pick`` took no argument).
    """
    import collections

    from iii.invocations import Invocation, PendingTable
    from iii.registry import FunctionRegistration, Registry, WorkerInfo

    registry = Registry()
    if hasattr(registry, "set_load"):
        pending = PendingTable(on_load=registry.set_load)  # type: ignore[call-arg,unused-ignore]

        def pick() -> Any:
            return entry.pick()  # type: ignore[call-arg,unused-ignore]

    else:  # the O(n) pick, which was handed the load
        pending = PendingTable()

        def pick() -> Any:
            return entry.pick(pending.executing_on)  # type: ignore[call-arg,unused-ignore]

    for i in range(replicas):
        registry.add_worker(WorkerInfo(id=f"w{i}"))
        registry.add_function(FunctionRegistration(function_id=ECHO, owner=f"w{i}"))
    entry = registry.functions[ECHO]
    open_calls: collections.deque[Any] = collections.deque()
    started = time.process_time()
    for n in range(calls):
        invocation = Invocation(
            invocation_id=str(n), function_id=ECHO, target_worker_id=pick().owner
        )
        pending.add(invocation)
        open_calls.append(invocation)
        if len(open_calls) > inflight:
            pending.discard(open_calls.popleft())
    return 1e6 * (time.process_time() - started) / calls


def cluster_routing_cost(replicas: int, calls: int, inflight: int, forwarded: int) -> float:
    """As :func:`routing_cost`, on a clustered engine: ``PEERS`` of the
    ``replicas`` are peer engines' (pseudo workers weighed by their calls in
    flight plus one), the rest local.  ``forwarded``: the calls come from a
    peer, so only local replicas may take them.

    Either the current API (peers' loads set in the registry, an O(1) pick)
    or the one before it (``FunctionEntry.pick_by``, handed the load, which
    sorted the replicas on every call).
    """
    import collections

    from iii.invocations import Invocation, PendingTable
    from iii.registry import FunctionEntry, FunctionRegistration, Registry, WorkerInfo

    registry = Registry()
    pending = PendingTable(on_load=registry.set_load)
    current = hasattr(FunctionEntry, "pick_local")
    in_flight: dict[str, int] = {}
    for i in range(replicas):
        owner = f"cluster:p{i}" if i < PEERS else f"w{i}"
        remote = i < PEERS
        if current:
            registry.add_worker(WorkerInfo(id=owner, remote=remote))  # type: ignore[call-arg,unused-ignore]
        else:
            registry.add_worker(WorkerInfo(id=owner))
        if remote:
            in_flight[owner] = 0
            if current:
                registry.set_load(owner, 1)
        registry.add_function(FunctionRegistration(function_id=ECHO, owner=owner))
    entry = registry.functions[ECHO]

    def load(owner: str) -> int:
        peer = in_flight.get(owner)
        return pending.executing_on(owner) if peer is None else peer + 1

    def pick() -> Any:
        if current:
            if forwarded:
                return entry.pick_local(in_flight.__contains__)  # type: ignore[attr-defined,unused-ignore]
            return entry.pick()
        if forwarded:  # what routing.pick_replica did: the local replicas, then pick_by
            local = [r for r in entry.replicas.values() if r.owner not in in_flight]
            return entry.pick_by(pending.executing_on, among=local)  # type: ignore[attr-defined,unused-ignore]
        return entry.pick_by(load)  # type: ignore[attr-defined,unused-ignore]

    def peer_calls(owner: str, change: int) -> None:
        in_flight[owner] += change
        if current:
            registry.set_load(owner, in_flight[owner] + 1)

    open_calls: collections.deque[Any] = collections.deque()
    started = time.process_time()
    for n in range(calls):
        owner = pick().owner
        if owner in in_flight:
            peer_calls(owner, 1)
            open_calls.append(owner)
        else:
            invocation = Invocation(invocation_id=str(n), function_id=ECHO, target_worker_id=owner)
            pending.add(invocation)
            open_calls.append(invocation)
        if len(open_calls) > inflight:
            done = open_calls.popleft()
            if isinstance(done, str):
                peer_calls(done, -1)
            else:
                pending.discard(done)
    return 1e6 * (time.process_time() - started) / calls


# -- orchestration --------------------------------------------------------------------------


def measure(python: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    config = workdir / "scale.yaml"
    limit = args.large + 100
    config.write_text(
        f"port: {port}\nmax_connections: {limit}\nmax_connections_per_address: {limit}\n"
        f"max_pending_invocations: {args.pending + 1000}\nmodules: []\n"
    )
    engine = subprocess.Popen(
        [python, "-m", "iii", "--log-level", "warning", "serve", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        env = {**os.environ, "BENCH_SERVER_PID": str(engine.pid)}
        argv = [str(x) for x in (args.small, args.large, args.inflight, args.calls, args.pending)]
        out = subprocess.run(
            [sys.executable, __file__, "clients", f"ws://127.0.0.1:{port}/", *argv],
            capture_output=True,
            env=env,
            timeout=1800,
        )
        if out.returncode != 0:
            raise RuntimeError(f"client failed:\n{out.stderr.decode()[-3000:]}")
        return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))
    finally:
        engine.kill()
        engine.wait()


def measure_routing(python: str, args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for replicas in (1, args.large):
        done = subprocess.run(
            [python, __file__, "routing", str(replicas), "20000", str(args.inflight)],
            capture_output=True,
            check=True,
        )
        out[f"routing_{replicas}_us"] = float(done.stdout.decode().split()[-1])
    for replicas in (PEERS + 2, args.large):
        for forwarded in (0, 1):
            done = subprocess.run(
                [python, __file__, "cluster-routing", str(replicas), "5000", str(args.inflight)]
                + [str(forwarded)],
                capture_output=True,
                check=True,
            )
            key = f"cluster_{'forwarded_' if forwarded else ''}routing_{replicas}_us"
            out[key] = float(done.stdout.decode().split()[-1])
    return out


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    names = list(results)

    def med(name: str, *path: str) -> float:
        values = []
        for r in results[name]:
            value: Any = r
            for key in path:
                value = value[key]
            values.append(float(value))
        return statistics.median(values)

    print(f"medians of {args.rounds} round(s); load average now {os.getloadavg()[0]:.2f}")
    print(f"{'':46}" + "".join(f"{n:>14}" for n in names))

    def row(label: str, fmt: str, *path: str) -> None:
        print(f"{label:46}" + "".join(f"{med(n, *path):14{fmt}}" for n in names))

    for kind in ("functions", "triggers", "workers"):
        small = int(med(names[0], f"{kind}_list_small", "items"))
        large = int(med(names[0], f"{kind}_list_large", "items"))
        for key, what in (
            ("ms", "p50 ms"),
            ("max_ms", "max ms"),
            ("cpu_ms", "engine CPU ms"),
            ("faults", "engine minor faults"),
        ):
            row(f"{kind}::list, {small:,} {kind}, {what}", ".1f", f"{kind}_list_small", key)
            row(f"{kind}::list, {large:,} {kind}, {what}", ".1f", f"{kind}_list_large", key)
            pairs = [
                (med(n, f"{kind}_list_large", key), med(n, f"{kind}_list_small", key))
                for n in names
            ]
            print(
                f"{f'  ratio (items ratio {large / small:.2f})':46}"
                + "".join(f"{a / b:14.2f}" if b else f"{'n/a':>14}" for a, b in pairs)
            )
        for label in ("small", "large"):
            items = small if label == "small" else large
            row(
                f"  engine idle CPU, {items:,} {kind} (ms/s)",
                ".1f",
                f"{kind}_list_{label}",
                "idle_cpu_ms_per_s",
            )
    count = int(med(names[0], "replicas_large_count"))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("calls_per_s", "calls/s")):
        unit = "" if key == "calls_per_s" else " (ms)"
        row(f"echo {label}, 1 replica, {args.inflight} in flight{unit}", ".2f", "replicas_1", key)
        row(
            f"echo {label}, {count:,} replicas, {args.inflight} in flight{unit}",
            ".2f",
            f"replicas_{count}",
            key,
        )
    row("routing CPU per call, 1 replica (us)", ".1f", "routing_1_us")
    row(f"routing CPU per call, {args.large:,} replicas (us)", ".1f", f"routing_{args.large}_us")
    small_cluster = PEERS + 2
    for kind, label in (("", "a worker's call"), ("forwarded_", "a call a peer forwarded")):
        print(f"cluster ({PEERS} of the replicas on peer engines), {label}:")
        for replicas in (small_cluster, args.large):
            row(
                f"  routing CPU per call, {replicas:,} replicas (us)",
                ".1f",
                f"cluster_{kind}routing_{replicas}_us",
            )
        print(
            f"{f'  ratio {args.large:,} / {small_cluster} replicas (1 when O(1))':46}"
            + "".join(
                f"{med(n, f'cluster_{kind}routing_{args.large}_us') / med(n, f'cluster_{kind}routing_{small_cluster}_us'):14.2f}"
                for n in names
            )
        )
    row("RSS per connected worker (KiB)", ".1f", "rss_per_worker_kib")
    row(f"RSS per pending call, {args.pending:,} held (bytes)", ".0f", "rss_per_pending_call_bytes")
    row("engine RSS at the end (MiB)", ".0f", "engine_rss_mib")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "routing":
        print(routing_cost(*(int(a) for a in sys.argv[2:5])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "cluster-routing":
        print(cluster_routing_cost(*(int(a) for a in sys.argv[2:6])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "clients":
        asyncio.run(run_clients(sys.argv[2], *(int(a) for a in sys.argv[3:8])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", type=int, default=1000, help="items in the small list (and workers)"
    )
    parser.add_argument(
        "--large", type=int, default=4000, help="items in the large list, and replicas"
    )
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3000, help="calls per replica measurement")
    parser.add_argument("--pending", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--baseline-python", help="also measure the engine this interpreter imports"
    )
    args = parser.parse_args()
    engines = {"engine": sys.executable}
    if args.baseline_python:
        engines = {"baseline": args.baseline_python, **engines}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, python in engines.items():
                results[name].append(
                    {**measure_routing(python, args), **measure(python, args, Path(tmp))}
                )
    report(results, args)


if __name__ == "__main__":
    main()
