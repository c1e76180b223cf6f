"""Benchmark: HTTP requests routed to an SDK worker vs the same server answering alone.

One engine process runs with the REST module.  In the same run, the same
HTTP server (the REST port) is measured two ways:

* **baseline**: ``GET /bench/unrouted``, a path no route matches, answered
  404 by the REST module itself with its small JSON error body (no worker
  behind it).  The REST port has no built-in route (upstream has none; the
  engine's health is on the metrics port), and an unrouted request does the
  work the old ``GET /health`` baseline did: parse the request, look the
  route table up (a miss), write a small JSON answer.  A route to an
  engine-side function would add the invocation (the payload built from the
  request, the call, the answer read back), which is part of what the routed
  side measures, so it would no longer be the server alone;
* **routed**: ``GET /bench/hello``, an ``http`` trigger of an official SDK
  worker (0.4.1 and/or 0.25.0) whose handler returns
  ``{"status_code": 200, "body": {"ok": true}}``: HTTP -> engine -> worker
  WebSocket -> engine -> HTTP.

Each at 1 and 32 concurrent keep-alive connections, for ``--seconds`` each;
baseline and routed alternate so both see the same machine load, for
``--rounds`` rounds.  Reported, as the median over the rounds: requests/s,
p50 and p99 latency, routed/baseline (the median of each round's ratio), and
the CPU time the engine and the worker process spent per request (from
/proc: a figure that other load on a shared machine disturbs less than
throughput).  One round alone varies by about +-0.03 in the ratio here.

Load: ``wrk`` (``apt-get install wrk``) when installed, else (with a one-line
notice) a trio/h11 load generator of our own (``--load builtin``), in a
separate process either way.  ``--load both`` measures everything with each
of them in the same run, to show how far the built-in generator is from
``wrk``.  Only the ``bench`` extra is needed (no test-suite import): the SDK
worker's virtual environment is built on first use (``bench/_support.py``).

Run: ``python bench/bench_rest.py [--seconds 5] [--rounds 3] [--sdk 0.4.1 --sdk 0.25.0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKERS = {
    "0.4.1": """
        import asyncio, sys
        from iii import III, InitOptions

        async def hello(req):
            return {"status_code": 200, "body": {"ok": True}}

        async def main():
            iii = III(sys.argv[1], InitOptions(worker_name="bench041"))
            iii.register_function("bench::hello", hello)
            iii.register_trigger("http", "bench::hello", {"api_path": "/bench/hello", "http_method": "GET"})
            await iii.connect()
            print("READY", flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
    """,
    "0.25.0": """
        import sys, threading
        from iii import register_worker, InitOptions

        async def hello(req):
            return {"status_code": 200, "body": {"ok": True}}

        iii = register_worker(sys.argv[1], InitOptions(worker_name="bench025", otel={"enabled": False}))
        iii.register_function("bench::hello", hello)
        iii.register_trigger({"type": "http", "function_id": "bench::hello",
                              "config": {"api_path": "/bench/hello", "http_method": "GET"}})
        print("READY", flush=True)
        threading.Event().wait()
    """,
}


# -- load generation ---------------------------------------------------------------


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


BASELINE_PATH = "/bench/unrouted"


def run_wrk(url: str, connections: int, seconds: float, expect: int = 200) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    non_2xx = int(bad.group(1)) if bad else 0
    if expect != 200:  # wrk counts by class: every answer should be one of those
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        non_2xx = total - non_2xx
    return {
        "rps": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "unexpected": non_2xx,
        "socket_errors": errors.group(0) if errors else "",
    }


async def _builtin_load(
    host: str, port: int, path: str, connections: int, seconds: float, expect: int
) -> dict[str, float]:
    import h11
    import trio

    latencies: list[float] = []
    unexpected = 0
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def one_connection(deadline: float) -> None:
        nonlocal unexpected
        stream = await trio.open_tcp_stream(host, port)
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                conn.send(h11.Request(method="GET", target=path, headers=[("host", host)]))
                conn.send(h11.EndOfMessage())
                await stream.send_all(request)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        unexpected += event.status_code != expect
                    elif isinstance(event, h11.EndOfMessage):
                        break
                latencies.append(time.perf_counter() - started)
                conn.start_next_cycle()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(one_connection, started + seconds)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[max(0, int(len(latencies) * 0.99) - 1)],
        "unexpected": unexpected,
        "socket_errors": "",
    }


def run_builtin(url: str, connections: int, seconds: float, expect: int = 200) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "load", url, str(connections), str(seconds), str(expect)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- orchestration ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(url: str, status: int = 200, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return
        except urllib.error.HTTPError as error:
            if error.code == status:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered {status}")


def start_engine(workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    ws_port, rest_port = free_port(), free_port()
    config = workdir / "bench_rest.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            port: {ws_port}
            modules:
              - class: modules::api::RestApiModule
                config: {{port: {rest_port}, host: 127.0.0.1}}
            """
        )
    )
    engine = subprocess.Popen(
        [sys.executable, "-m", "iii", "--log-level", "warning", "serve", "-c", str(config)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(f"http://127.0.0.1:{rest_port}{BASELINE_PATH}", 404)  # the REST port answers
    return engine, ws_port, rest_port


def start_worker(version: str, ws_port: int, workdir: Path) -> subprocess.Popen[bytes]:
    from _support import sdk_python

    script = workdir / f"bench_worker_{version}.py"
    script.write_text(textwrap.dedent(WORKERS[version]))
    env = {**os.environ, "OTEL_ENABLED": "false"}
    env.pop("PYTHONPATH", None)
    worker = subprocess.Popen(
        [str(sdk_python(version)), str(script), f"ws://127.0.0.1:{ws_port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert worker.stdout is not None
    if worker.stdout.readline().strip() != b"READY":
        raise RuntimeError(f"SDK {version} worker did not start")
    return worker


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    load,
    url: str,
    connections: int,
    seconds: float,
    engine_pid: int,
    worker_pid: int,
    expect: int = 200,
):  # type: ignore[no-untyped-def]
    engine_before, worker_before = cpu_seconds(engine_pid), cpu_seconds(worker_pid)
    row = load(url, connections, seconds, expect)
    requests = row["rps"] * seconds
    row["engine_cpu_us"] = 1e6 * (cpu_seconds(engine_pid) - engine_before) / requests
    row["worker_cpu_us"] = 1e6 * (cpu_seconds(worker_pid) - worker_before) / requests
    return row


def _median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    row: dict[str, float] = {}
    for key in ("rps", "p50_ms", "p99_ms", "engine_cpu_us", "worker_cpu_us"):
        row[key] = statistics.median(r[key] for r in rows)
    row["unexpected"] = sum(r["unexpected"] for r in rows)
    row["socket_errors"] = "; ".join(str(r["socket_errors"]) for r in rows if r["socket_errors"])  # type: ignore[assignment]
    return row


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        from urllib.parse import urlsplit

        import trio

        target = urlsplit(sys.argv[2])
        result = trio.run(
            _builtin_load,
            target.hostname,
            target.port,
            target.path,
            int(sys.argv[3]),
            float(sys.argv[4]),
            int(sys.argv[5]),
        )
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sdk", action="append", choices=list(WORKERS), help="default: both")
    parser.add_argument(
        "--load", choices=["wrk", "builtin", "both"], help="default: wrk if installed"
    )
    args = parser.parse_args()
    if args.load is None:
        args.load = "wrk" if shutil.which("wrk") else "builtin"
        if args.load == "builtin":
            print(
                WRK_MISSING + "; using the built-in load generator (--load builtin)",
                file=sys.stderr,
            )
    elif args.load != "builtin" and not shutil.which("wrk"):
        print(f"bench_rest: {WRK_MISSING}", file=sys.stderr)
        sys.exit(2)
    loaders = {"wrk": run_wrk, "builtin": run_builtin}
    if args.load != "both":
        loaders = {args.load: loaders[args.load]}
    for name, load in loaders.items():
        print(f"=== load generator: {name}", flush=True)
        run_all(args, name, load)


WRK_MISSING = "wrk is not installed (install it with: apt-get install wrk)"


def run_all(args: argparse.Namespace, load_name: str, load: Any) -> None:
    rounds: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        engine, ws_port, rest_port = start_engine(workdir)
        base = f"http://127.0.0.1:{rest_port}"
        try:
            for version in args.sdk or list(WORKERS):
                worker = start_worker(version, ws_port, workdir)
                try:
                    wait_until(base + "/bench/hello")
                    load(base + "/bench/hello", 4, 1)  # warm up both paths
                    load(base + BASELINE_PATH, 4, 1, 404)
                    for _ in range(args.rounds):
                        for connections in (1, 32):
                            rounds.setdefault(
                                f"baseline c{connections} ({version} run)", []
                            ).append(
                                measure(
                                    load,
                                    base + BASELINE_PATH,
                                    connections,
                                    args.seconds,
                                    engine.pid,
                                    worker.pid,
                                    expect=404,
                                )
                            )
                            rounds.setdefault(f"sdk {version} c{connections}", []).append(
                                measure(
                                    load,
                                    base + "/bench/hello",
                                    connections,
                                    args.seconds,
                                    engine.pid,
                                    worker.pid,
                                )
                            )
                finally:
                    stop(worker)
        finally:
            stop(engine)
    results = {name: _median_row(rows) for name, rows in rounds.items()}
    for version in args.sdk or list(WORKERS):
        for connections in (1, 32):
            ratios = [
                routed["rps"] / baseline["rps"]
                for routed, baseline in zip(
                    rounds[f"sdk {version} c{connections}"],
                    rounds[f"baseline c{connections} ({version} run)"],
                    strict=True,
                )
            ]
            row = results[f"sdk {version} c{connections}"]
            row["ratio"] = statistics.median(ratios)
            row["ratios"] = [round(r, 3) for r in ratios]  # type: ignore[assignment]
    print(
        f"load generator: {load_name}, {args.seconds:g} s per measurement, medians of {args.rounds} alternating "
        f"rounds, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; CPU columns: microseconds of CPU per request"
    )
    print(
        f"{'':34}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}{'engine us':>11}{'worker us':>11}"
    )
    for version in args.sdk or list(WORKERS):
        for connections in (1, 32):
            baseline = results[f"baseline c{connections} ({version} run)"]
            routed = results[f"sdk {version} c{connections}"]
            for label, row, ratio in (
                (f"baseline 404, {connections} conn", baseline, ""),
                (f"SDK {version} route, {connections} conn", routed, f"{routed['ratio']:8.2f}"),
            ):
                print(
                    f"{label:34}{row['rps']:10.0f}{row['p50_ms']:9.2f}{row['p99_ms']:9.2f}{ratio:>8}"
                    f"{row['engine_cpu_us']:11.0f}{row['worker_cpu_us']:11.0f}"
                )
            for row in (baseline, routed):
                if row["unexpected"] or row["socket_errors"]:
                    print(
                        f"  !! errors: unexpected status {row['unexpected']} {row['socket_errors']}"
                    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
