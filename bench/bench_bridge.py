"""Benchmark: what a call through the BridgeClient costs, and how fast the link comes back.

Two engines in one process (trio, loopback sockets): a *backend* with an
engine function ``backend::echo``, and an *edge* running
``modules::bridge_client::BridgeClientModule`` with ``remote::echo`` forwarded
to it.  Measured, each in one run:

* sequential round trip p50/p99 of ``edge.invoke("remote::echo")`` (engine
  function -> link -> backend -> back), against a local engine function
  called the same way (the floor: what the bridge adds is the difference);
* throughput with 1, 8 and 64 concurrent callers;
* how long a call takes to fail ``bridge_unavailable`` while the backend is
  down (it must not wait for its 30 s timeout);
* the time from a restarted backend listening to the link being up again
  (with ``backoff_initial_ms: 50``: the wait is mostly the backoff).

Both engines share one trio thread, so the figures are a lower bound on
latency and an upper bound on cost per call for a one-host setup.

Run: ``python bench/bench_bridge.py [--calls 3000] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import attrs
import trio

from iii.errors import IIIError
from iii.native import CallContext
from iii.testing import make_config, open_test_engine

BRIDGE = "modules::bridge_client::BridgeClientModule"


async def echo(data: Any, ctx: CallContext) -> Any:
    return data


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(invoke: Any, calls: int) -> list[float]:
    times = []
    for index in range(calls):
        start = time.perf_counter()
        await invoke(index)
        times.append(time.perf_counter() - start)
    return times


async def throughput(invoke: Any, callers: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await invoke(done)
            done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return done / seconds


async def main(calls: int, seconds: float) -> None:
    port = _free_port()
    backend_config = attrs.evolve(make_config(), port=port)
    bridge = {
        "class": BRIDGE,
        "config": {
            "url": f"ws://127.0.0.1:{port}",
            "backoff_initial_ms": 50,
            "backoff_max_ms": 50,
            "forward": [{"local_function": "remote::echo", "remote_function": "backend::echo"}],
        },
    }
    async with open_test_engine(make_config(modules=[bridge])) as edge:
        edge.register_function("local::echo", echo)
        link = next(m for k, m in edge.modules.items() if k.startswith("bridge_client:")).link
        async with open_test_engine(backend_config) as backend:
            backend.register_function("backend::echo", echo)
            assert await link.wait_connected(15)

            async def local(value: Any) -> Any:
                return await edge.invoke("local::echo", value)

            async def bridged(value: Any) -> Any:
                return await edge.invoke("remote::echo", value)

            for name, invoke in (("local engine function", local), ("through the bridge", bridged)):
                await sequential(invoke, 200)  # warm up
                times = await sequential(invoke, calls)
                print(
                    f"{name:24s} sequential p50 {percentile(times, 0.5) * 1e6:7.0f} us"
                    f"  p99 {percentile(times, 0.99) * 1e6:7.0f} us"
                    f"  mean {statistics.mean(times) * 1e6:7.0f} us"
                )
                for callers in (1, 8, 64):
                    rate = await throughput(invoke, callers, seconds)
                    print(f"{name:24s} {callers:3d} callers: {rate:9.0f} calls/s")
            backend.request_shutdown()
        assert await link.wait_disconnected(15)
        failures = []
        for _ in range(100):
            start = time.perf_counter()
            try:
                await edge.invoke("remote::echo", 1)
            except IIIError as exc:
                assert exc.code == "bridge_unavailable", exc.code
            failures.append(time.perf_counter() - start)
        print(
            f"link down: bridge_unavailable after p50 {percentile(failures, 0.5) * 1e6:.0f} us,"
            f" max {max(failures) * 1e6:.0f} us (the call's timeout is 30 s)"
        )
        async with open_test_engine(backend_config) as backend:
            listening = time.perf_counter()
            backend.register_function("backend::echo", echo)
            assert await link.wait_connected(15)
            print(
                f"backend restarted: link up {((time.perf_counter() - listening) * 1e3):.0f} ms"
                " after it listens (backoff 50 ms)"
            )
            assert await edge.invoke("remote::echo", 2) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=3.0)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    trio.run(main, arguments.calls, arguments.seconds)
