"""What tracing costs on the hot path: ``Engine.invoke`` of an engine function.

Three runs in the same process, reported as ratios to the first:

* ``noop``: the default tracer (one attribute check per call);
* ``hook``: a tracer that is enabled but makes no spans (the cost of the hook
  itself: one extra call level and a context manager);
* ``otel``: the observability module's tracer, memory exporter, every call sampled.

Then the same for queue jobs (builtin in-memory adapter, one trigger, an
engine function): ``noop`` vs ``otel``, where ``otel`` adds a consumer span per
job around the function's invocation span.

Run: ``python bench/bench_tracing.py [calls] [jobs]``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import trio

from iii.modules.observability.metrics import EngineMetrics
from iii.modules.observability.spans import MemorySpanProcessor, SpanStore
from iii.modules.observability.tracer import OtelTracer
from iii.registry import TriggerRegistration
from iii.testing import make_config, open_test_engine
from iii.tracing import NOOP_TRACER, EngineTracer


class HookOnly(EngineTracer):
    enabled = True


async def run(calls: int) -> dict[str, float]:
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(MemorySpanProcessor(SpanStore(1000)))
    tracers: dict[str, EngineTracer] = {
        "noop": NOOP_TRACER,
        "hook": HookOnly(),
        "otel": OtelTracer(provider.get_tracer("bench"), EngineMetrics()),
    }
    results: dict[str, float] = {}
    async with open_test_engine(make_config()) as engine:

        async def echo(data: Any, ctx: Any) -> Any:
            return data

        engine.register_function("bench::echo", echo)
        for _ in range(2):  # the second round is the one reported (warm)
            for name, tracer in tracers.items():
                engine.tracer = tracer
                started = time.perf_counter()
                for _ in range(calls):
                    await engine.invoke("bench::echo", 1)
                results[name] = (time.perf_counter() - started) / calls
        engine.tracer = NOOP_TRACER
    return results


async def run_queue(jobs: int) -> dict[str, float]:
    """Seconds per job, enqueue to processed, with each tracer (second round reported)."""
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(MemorySpanProcessor(SpanStore(1000)))
    tracers: dict[str, EngineTracer] = {
        "noop": NOOP_TRACER,
        "otel": OtelTracer(provider.get_tracer("bench"), EngineMetrics()),
    }
    adapter = {"class": "modules::queue::BuiltinQueueAdapter", "config": {"poll_interval_ms": 1}}
    modules = [{"class": "modules::queue::QueueModule", "config": {"adapter": adapter}}]
    results: dict[str, float] = {}
    async with open_test_engine(make_config(modules=modules)) as engine:
        done = trio.Event()
        seen = 0
        target = 0

        async def job(data: Any, ctx: Any) -> None:
            nonlocal seen
            seen += 1
            if seen == target:
                done.set()

        engine.register_function("bench::job", job)
        refused = engine.register_trigger(
            TriggerRegistration(
                worker_id=None,
                id="bench",
                trigger_type="queue",
                function_id="bench::job",
                config={"topic": "bench", "concurrency": 10},
            )
        )
        assert refused is None
        for _ in range(2):
            for name, tracer in tracers.items():
                engine.tracer = tracer
                done, seen, target = trio.Event(), 0, jobs
                started = time.perf_counter()
                for i in range(jobs):
                    await engine.invoke("enqueue", {"topic": "bench", "data": i})
                await done.wait()
                results[name] = (time.perf_counter() - started) / jobs
        engine.tracer = NOOP_TRACER
    return results


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 5_000
    results = trio.run(run, calls)
    base = results["noop"]
    print("Engine.invoke of an engine function:")
    for name, seconds in results.items():
        print(f"  {name:5s} {seconds * 1e6:8.2f} us/call  x{seconds / base:.2f}")
    results = trio.run(run_queue, jobs)
    base = results["noop"]
    print("Queue jobs (enqueue + consume, builtin memory adapter):")
    for name, seconds in results.items():
        print(f"  {name:5s} {seconds * 1e6:8.2f} us/job   x{seconds / base:.2f}")


if __name__ == "__main__":
    main()
