"""Benchmark: what an embedded engine costs a test (the pytest fixtures' price).

Per iteration, with the default modules on free loopback ports:

* ``open``: ``EngineBuilder().free_ports().open()`` until the block runs (the
  modules started, every port bound, native registrations done);
* ``close``: one ``engine.call`` and leaving the block (the graceful shutdown);
* ``thread``: ``run_in_thread()`` start, one call, stop (``iii_engine_thread``).

Prints the median and the maximum of each, in milliseconds.

Run: ``python bench/bench_embed.py [--rounds 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from iii import EngineBuilder


async def in_trio(rounds: int) -> tuple[list[float], list[float]]:
    opens, closes = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        async with EngineBuilder().free_ports().open() as engine:
            ready = time.perf_counter()
            await engine.call("engine::functions::list", {})
        opens.append((ready - started) * 1000)
        closes.append((time.perf_counter() - ready) * 1000)
    return opens, closes


def in_thread(rounds: int) -> list[float]:
    took = []
    for _ in range(rounds):
        started = time.perf_counter()
        with EngineBuilder().free_ports().run_in_thread() as engine:
            engine.call("engine::functions::list", {})
        took.append((time.perf_counter() - started) * 1000)
    return took


def report(name: str, values: list[float]) -> None:
    print(f"{name:8} median {statistics.median(values):7.1f} ms   max {max(values):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    opens, closes = trio.run(in_trio, args.rounds)
    report("open", opens)
    report("close", closes)
    report("thread", in_thread(args.rounds))


if __name__ == "__main__":
    main()
