"""Queue throughput and latency: enqueue → handler → ack, per adapter, 1 and 4 consumers.

Each case runs an engine in this process with only the queue module, a
native (in-engine) handler, and ``PRODUCERS`` tasks calling ``enqueue``
concurrently; "consumers" are ``queue`` triggers on the topic with
concurrency 1 each, so 1 consumer means one job at a time.  Reported:
jobs/s from the first enqueue to the last ack, and the p50 enqueue-to-start
latency (from the ``enqueue`` call to the handler starting) measured
afterwards on an idle queue, one job at a time (50 samples), so it is not
the backlog's waiting time.

Baselines measured in the same run, same N and consumer counts:

* raw Redis Streams: ``XADD`` / ``XREADGROUP COUNT 1`` / ``XACK`` loop with coredis;
* raw AMQP: confirmed publish / ``basic.consume`` (prefetch 1) / ack with the
  same trio AMQP client the RabbitMQ adapter uses (:mod:`iii.adapters.queue.amqp`).

Run: ``python bench/bench_queue.py [N]`` (Redis and RabbitMQ on 127.0.0.1;
cases whose service is down are skipped).  Numbers depend on the machine;
compare rows of one run, not runs.
"""

from __future__ import annotations

import logging
import socket
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import trio

from iii.registry import TriggerRegistration
from iii.testing import make_config, open_test_engine

PRODUCERS = 8
REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def adapter(kind: str, directory: str, prefix: str) -> dict[str, Any]:
    common = {"poll_interval_ms": 10}
    if kind == "builtin-memory":
        return {"class": "modules::queue::BuiltinQueueAdapter", "config": common}
    if kind == "builtin-file":
        return {
            "class": "modules::queue::BuiltinQueueAdapter",
            "config": {**common, "store_method": "file_based", "file_path": directory},
        }
    if kind == "redis":
        return {
            "class": "modules::queue::RedisAdapter",
            "config": {**common, "redis_url": REDIS_URL, "key_prefix": prefix},
        }
    return {"class": "modules::queue::RabbitMQAdapter", "config": {**common, "amqp_url": AMQP_URL}}


async def produce(total: int, send: Any) -> None:
    async def producer(indices: range) -> None:
        for i in indices:
            await send(i)

    async with trio.open_nursery() as nursery:
        for p in range(PRODUCERS):
            nursery.start_soon(producer, range(p, total, PRODUCERS))


LATENCY_SAMPLES = 50


class Arrivals:
    """Counts handler starts; ``wait(n)`` returns once ``n`` have started."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = trio.Event()

    def hit(self) -> None:
        self.count += 1
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, n: int) -> None:
        with trio.fail_after(60):
            while self.count < n:
                await self.changed.wait()


async def idle_latency(send: Any, arrivals: Arrivals, latencies: list[float], first: int) -> float:
    """p50 enqueue-to-start with an empty queue: one job at a time."""
    latencies.clear()
    for k in range(LATENCY_SAMPLES):
        await send(first + k)
        await arrivals.wait(first + k + 1)
    return statistics.median(latencies)


async def run_engine_case(kind: str, consumers: int, total: int) -> tuple[float, float]:
    topic = f"bench{uuid.uuid4().hex[:8]}"
    prefix = f"iiibench:{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as directory:
        modules = [
            {
                "class": "modules::queue::QueueModule",
                "config": {"adapter": adapter(kind, directory, prefix)},
            }
        ]
        async with open_test_engine(make_config(modules=modules)) as engine:
            sent: dict[int, float] = {}
            latencies: list[float] = []
            done = trio.Event()
            count = 0

            arrivals = Arrivals()

            async def handler(data: Any, ctx: Any) -> None:
                nonlocal count
                latencies.append(time.perf_counter() - sent[data["i"]])
                arrivals.hit()
                count += 1
                if count == total:
                    done.set()

            engine.register_function("bench::h", handler)
            for c in range(consumers):
                engine.register_trigger(
                    TriggerRegistration(
                        worker_id=None,
                        id=f"c{c}",
                        trigger_type="queue",
                        function_id="bench::h",
                        config={"topic": topic, "concurrency": 1},
                    )
                )
            await trio.sleep(0.3)

            async def send(i: int) -> None:
                sent[i] = time.perf_counter()
                await engine.invoke("enqueue", {"topic": topic, "data": {"i": i}})

            start = time.perf_counter()
            await produce(total, send)
            with trio.fail_after(300):
                await done.wait()
            elapsed = time.perf_counter() - start
            p50 = await idle_latency(send, arrivals, latencies, total)
        await cleanup(kind, prefix, topic)
    return total / elapsed, p50


async def cleanup(kind: str, prefix: str, topic: str) -> None:
    if kind == "redis":
        import coredis

        async with coredis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
            keys = [k async for k in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(keys)
    elif kind == "rabbitmq":
        from pamqp.commands import Exchange, Queue

        from iii.adapters.queue.amqp import open_amqp_connection

        async with open_amqp_connection(AMQP_URL) as connection:
            channel = await connection.channel()
            for name in (f"iii.{topic}.queue", f"iii.{topic}.dlq"):
                await channel.rpc(Queue.Delete(queue=name))
            await channel.rpc(Exchange.Delete(exchange=f"iii.{topic}.exchange"))


async def run_raw_redis(consumers: int, total: int) -> tuple[float, float]:
    import coredis

    stream = f"iiibench:{uuid.uuid4().hex[:8]}:raw"
    async with coredis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
        await client.xgroup_create(stream, "g", "0", mkstream=True)
        sent: dict[int, float] = {}
        latencies: list[float] = []
        done = trio.Event()
        count = 0
        arrivals = Arrivals()

        async def consumer(name: str) -> None:
            nonlocal count
            while True:
                result = await client.xreadgroup(
                    "g", name, streams={stream: ">"}, count=1, block=100
                )
                for entries in (result or {}).values():
                    for entry in entries:
                        latencies.append(time.perf_counter() - sent[int(entry.field_values["i"])])
                        arrivals.hit()
                        await client.xack(stream, "g", [entry.identifier])
                        count += 1
                        if count == total:
                            done.set()

        async def send(i: int) -> None:
            sent[i] = time.perf_counter()
            await client.xadd(stream, {"i": str(i)})

        async with trio.open_nursery() as nursery:
            for c in range(consumers):
                nursery.start_soon(consumer, f"c{c}")
            start = time.perf_counter()
            await produce(total, send)
            await done.wait()
            elapsed = time.perf_counter() - start
            p50 = await idle_latency(send, arrivals, latencies, total)
            nursery.cancel_scope.cancel()
        await client.delete([stream])
    return total / elapsed, p50


async def run_raw_amqp(consumers: int, total: int) -> tuple[float, float]:
    from pamqp.commands import Basic, Queue

    from iii.adapters.queue.amqp import open_amqp_connection

    queue = f"iiibench.raw.{uuid.uuid4().hex[:8]}"
    async with open_amqp_connection(AMQP_URL) as connection:
        publisher = await connection.channel()
        await publisher.confirm_select()
        await publisher.rpc(Queue.Declare(queue=queue, durable=True))
        sent: dict[int, float] = {}
        latencies: list[float] = []
        done = trio.Event()
        count = 0
        arrivals = Arrivals()

        async def consumer() -> None:
            nonlocal count
            channel = await connection.channel()
            _, messages = await channel.consume(queue, 1)
            async for message in messages:
                latencies.append(time.perf_counter() - sent[int(message.body)])
                arrivals.hit()
                channel.ack_nowait(message.delivery_tag)
                count += 1
                if count == total:
                    done.set()

        async def send(i: int) -> None:
            sent[i] = time.perf_counter()
            await publisher.publish("", queue, str(i).encode(), Basic.Properties(delivery_mode=2))

        async with trio.open_nursery() as nursery:
            for _ in range(consumers):
                nursery.start_soon(consumer)
            await trio.sleep(0.2)
            start = time.perf_counter()
            await produce(total, send)
            await done.wait()
            elapsed = time.perf_counter() - start
            p50 = await idle_latency(send, arrivals, latencies, total)
            nursery.cancel_scope.cancel()
        await publisher.rpc(Queue.Delete(queue=queue))
    return total / elapsed, p50


async def main(total: int) -> None:
    logging.basicConfig(level=logging.ERROR)
    rows: list[tuple[str, int, float, float]] = []
    cases: list[tuple[str, Any]] = [("builtin-memory", None), ("builtin-file", None)]
    if up(6379):
        cases += [("redis", None), ("raw XADD/XREADGROUP/XACK", run_raw_redis)]
    if up(5672):
        cases += [("rabbitmq", None), ("raw AMQP publish/consume", run_raw_amqp)]
    for name, raw in cases:
        for consumers in (1, 4):
            if raw is None:
                rate, p50 = await run_engine_case(name, consumers, total)
            else:
                rate, p50 = await raw(consumers, total)
            rows.append((name, consumers, rate, p50))
            print(
                f"{name:28s} consumers={consumers}  {rate:8.0f} jobs/s   p50 idle enqueue->start {p50 * 1000:7.2f} ms",
                flush=True,
            )
    by = {(n, c): r for n, c, r, _ in rows}
    print()
    for engine_kind, raw_kind in (
        ("redis", "raw XADD/XREADGROUP/XACK"),
        ("rabbitmq", "raw AMQP publish/consume"),
    ):
        for consumers in (1, 4):
            if (engine_kind, consumers) in by and (raw_kind, consumers) in by:
                ratio = by[(engine_kind, consumers)] / by[(raw_kind, consumers)]
                print(f"{engine_kind} / raw baseline, consumers={consumers}: {ratio:.2f}")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
