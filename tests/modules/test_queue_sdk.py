"""Queue and cron end to end with the official Python SDK workers (0.4.1, 0.9.0 and 0.25.0).

* enqueue → queue trigger (every SDK generation), and the enqueue action;
* retries → DLQ → redrive;
* a worker killed mid-job: the job is delivered again to the next worker;
* ``kill -9`` of an engine process with jobs pending, then a restart: nothing
  is lost, on builtin-file, Redis and RabbitMQ;
* two engine processes on one Redis: each job runs once, each cron tick fires once.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from iii.testing import make_config, open_test_engine
from tests.support import EngineProcess, require_rabbitmq, require_redis, start_sdk_worker

pytestmark = pytest.mark.sdk

# A 0.4.1 worker: function <PREFIX>::job on a queue trigger for TOPIC (and an
# optional cron trigger); prints JOB/TICK lines; stdin commands call functions.
WORKER_041 = """
import asyncio, json, os, sys
from iii import III, InitOptions

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name=os.environ.get("NAME", "w041")))
    state = {"healthy": os.environ.get("HEALTHY", "1") == "1"}
    prefix = os.environ.get("PREFIX", "w041")

    async def job(data):
        print("JOB " + json.dumps(data), flush=True)
        if isinstance(data, dict):
            if data.get("slow"):
                await asyncio.sleep(float(data["slow"]))
            if data.get("fail") and not state["healthy"]:
                raise Exception("job failed on purpose")
        print("DONE " + json.dumps(data), flush=True)
        return None

    async def tick(data):
        print("TICK " + data["scheduled_time"], flush=True)

    iii.register_function(prefix + "::job", job)
    iii.register_trigger("queue", prefix + "::job", {"topic": os.environ["TOPIC"], "concurrency": int(os.environ.get("CONCURRENCY", "10"))})
    if os.environ.get("CRON"):
        iii.register_function(prefix + "::tick", tick)
        iii.register_trigger("cron", prefix + "::tick", {"expression": os.environ["CRON"]})
    await iii.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        try:
            if cmd["op"] == "heal":
                state["healthy"] = True
                out = None
            else:
                out = await iii.trigger(cmd["fn"], cmd.get("data"), timeout=20)
            print("OK " + json.dumps(out), flush=True)
        except Exception as exc:
            print("ERR " + str(exc), flush=True)

asyncio.run(main())
"""

WORKER_025 = """
import json, os, sys
from iii import register_worker, InitOptions, InvocationError, TriggerAction

iii = register_worker(sys.argv[1], InitOptions(worker_name="w025", otel={"enabled": False}))

def job(data):
    print("JOB " + json.dumps(data), flush=True)
    return None

iii.register_function("w025::job", job)
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "enqueue_action":
            out = iii.trigger({"function_id": "w025::job", "payload": cmd["data"], "action": TriggerAction.Enqueue(queue=cmd["queue"])})
        else:
            out = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data")})
        print("OK " + json.dumps(out), flush=True)
    except InvocationError as exc:
        print("ERR " + json.dumps({"code": exc.code, "message": exc.message}), flush=True)
iii.shutdown()
"""

# A 0.9.0 worker (Motia 1.0's SDK): w090::job on a queue trigger for TOPIC;
# stdin commands call functions, or enqueue with TriggerAction.Enqueue.
WORKER_090 = """
import ast, json, os, sys, threading
from iii import register_worker, InitOptions, TriggerAction

PRINT = threading.Lock()
iii = register_worker(sys.argv[1], InitOptions(worker_name="w090"))

async def job(data):
    with PRINT:
        print("JOB " + json.dumps(data), flush=True)
    return None

iii.register_function({"id": "w090::job"}, job)
iii.register_trigger({"type": "queue", "function_id": "w090::job", "config": {"topic": os.environ["TOPIC"]}})
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "enqueue_action":
            out = iii.trigger({"function_id": "w090::job", "payload": cmd["data"], "action": TriggerAction.Enqueue(queue=cmd["queue"])})
        else:
            out = iii.trigger({"function_id": cmd["fn"], "payload": cmd.get("data")})
        line = "OK " + json.dumps(out)
    except Exception as exc:
        body = ast.literal_eval(str(exc)) if str(exc).startswith("{") else {"code": None, "message": str(exc)}
        line = "ERR " + json.dumps({"code": body.get("code"), "message": body.get("message")})
    with PRINT:
        print(line, flush=True)
iii.shutdown()
"""


async def command(worker: Any, **cmd: Any) -> str:
    """Send one command; the reply line (``OK <json>`` or ``ERR <text>``)."""
    status, rest = await worker.request(json.dumps(cmd))
    return f"{status} {rest}"


async def collect(worker: Any, prefix: str, count: int, timeout: float = 30) -> list[Any]:
    found: list[Any] = []
    with trio.fail_after(timeout):
        while len(found) < count:
            line = await worker.wait_for(prefix, timeout=timeout)
            found.append(
                json.loads(line[len(prefix) :]) if prefix != "TICK " else line[len(prefix) :]
            )
    return found


async def wait_function(engine: Any, function_id: str) -> None:
    with trio.fail_after(30):
        while function_id not in engine.registry.functions:
            await trio.sleep(0.05)


def queue_module(adapter_config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    config = {"backoff_ms": 100, "poll_interval_ms": 20, **(adapter_config or {})}
    return [
        {
            "class": "modules::queue::QueueModule",
            "config": {
                "adapter": {"class": "modules::queue::BuiltinQueueAdapter", "config": config}
            },
        }
    ]


async def test_enqueue_to_queue_trigger_and_enqueue_action_both_sdks() -> None:
    topic = f"sdk{uuid.uuid4().hex[:8]}"
    async with open_test_engine(make_config(modules=queue_module())) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with (
            start_sdk_worker("0.4.1", WORKER_041, url=url, env={"TOPIC": topic}) as w041,
            start_sdk_worker("0.25.0", WORKER_025, url=url) as w025,
        ):
            await w041.wait_for("READY")
            await w025.wait_for("READY")
            await wait_function(engine, "w025::job")
            with trio.fail_after(20):
                while not engine.modules["queue"].subscriptions:
                    await trio.sleep(0.05)
            for i in range(5):
                line = await command(
                    w025, op="call", fn="enqueue", data={"topic": topic, "data": {"n": i}}
                )
                assert line == "OK null"
            jobs = await collect(w041, "JOB ", 5)
            assert sorted(j["n"] for j in jobs) == list(range(5))
            assert all(set(j) == {"n"} for j in jobs)  # exactly as published

            line = await command(w025, op="call", fn="enqueue", data={"topic": "", "data": 1})
            assert json.loads(line[4:])["code"] == "topic_not_set"

            line = await command(
                w025, op="enqueue_action", queue="sdk-jobs", data={"via": "action"}
            )
            assert line.startswith("OK "), line
            receipt = json.loads(line[3:])
            assert uuid.UUID(receipt["messageReceiptId"])
            assert await collect(w025, "JOB ", 1) == [{"via": "action"}]


async def test_enqueue_to_queue_trigger_and_enqueue_action_sdk_090() -> None:
    topic = f"sdk{uuid.uuid4().hex[:8]}"
    async with open_test_engine(make_config(modules=queue_module())) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker("0.9.0", WORKER_090, url=url, env={"TOPIC": topic}) as worker:
            await worker.wait_for("READY", timeout=60)
            await wait_function(engine, "w090::job")
            with trio.fail_after(20):
                while not engine.modules["queue"].subscriptions:
                    await trio.sleep(0.05)
            for i in range(5):
                line = await command(
                    worker, op="call", fn="enqueue", data={"topic": topic, "data": {"n": i}}
                )
                assert line == "OK null"
            jobs = await collect(worker, "JOB ", 5)
            assert sorted(j["n"] for j in jobs) == list(range(5))
            assert all(set(j) == {"n"} for j in jobs)

            line = await command(worker, op="call", fn="enqueue", data={"topic": "", "data": 1})
            assert json.loads(line[4:])["code"] == "topic_not_set"

            line = await command(
                worker, op="enqueue_action", queue="sdk-jobs", data={"via": "action"}
            )
            assert line.startswith("OK "), line
            assert uuid.UUID(json.loads(line[3:])["messageReceiptId"])
            assert await collect(worker, "JOB ", 1) == [{"via": "action"}]


async def test_retries_then_dlq_then_redrive_with_sdk() -> None:
    topic = f"sdk{uuid.uuid4().hex[:8]}"
    async with open_test_engine(make_config(modules=queue_module({"max_attempts": 3}))) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker(
            "0.4.1", WORKER_041, url=url, env={"TOPIC": topic, "HEALTHY": "0"}
        ) as worker:
            await worker.wait_for("READY")
            await wait_function(engine, "w041::job")
            assert (
                await command(
                    worker, op="call", fn="enqueue", data={"topic": topic, "data": {"fail": True}}
                )
                == "OK null"
            )
            attempts = await collect(worker, "JOB ", 3)
            assert attempts == [{"fail": True}] * 3
            with trio.fail_after(10):
                while True:
                    line = await command(
                        worker, op="call", fn="engine::queue::topic_stats", data={"topic": topic}
                    )
                    if json.loads(line[3:])["dlq"] == 1:
                        break
                    await trio.sleep(0.1)
            line = await command(
                worker, op="call", fn="engine::queue::dlq_messages", data={"topic": topic}
            )
            listed = json.loads(line[3:])
            assert (
                listed["total"] == 1 and "job failed on purpose" in listed["messages"][0]["error"]
            )
            await command(worker, op="heal")
            line = await command(worker, op="call", fn="iii::queue::redrive", data={"queue": topic})
            assert json.loads(line[3:]) == {"queue": topic, "redriven": 1}
            assert await collect(worker, "DONE ", 1) == [{"fail": True}]


async def test_worker_killed_mid_job_is_redelivered() -> None:
    topic = f"sdk{uuid.uuid4().hex[:8]}"
    async with open_test_engine(make_config(modules=queue_module())) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker(
            "0.4.1", WORKER_041, url=url, env={"TOPIC": topic, "NAME": "first"}
        ) as first:
            await first.wait_for("READY")
            await wait_function(engine, "w041::job")
            await command(
                first,
                op="call",
                fn="enqueue",
                data={"topic": topic, "data": {"slow": 60, "id": "x"}},
            )
            assert await collect(first, "JOB ", 1) == [{"slow": 60, "id": "x"}]
            first.kill()
            await first.process.wait()
        with trio.fail_after(10):
            while "w041::job" in engine.registry.functions:
                await trio.sleep(0.05)
        async with start_sdk_worker(
            "0.4.1", WORKER_041, url=url, env={"TOPIC": topic, "NAME": "second"}
        ) as second:
            assert await collect(second, "JOB ", 1) == [{"slow": 60, "id": "x"}]


def _adapter_for(kind: str, directory: Path, prefix: str) -> dict[str, Any]:
    common = {"backoff_ms": 200, "poll_interval_ms": 20, "visibility_timeout_ms": 2000}
    if kind == "file":
        return {
            "class": "modules::queue::BuiltinQueueAdapter",
            "config": {
                **common,
                "store_method": "file_based",
                "file_path": str(directory / "queue"),
            },
        }
    if kind == "redis":
        return {
            "class": "modules::queue::RedisAdapter",
            "config": {**common, "redis_url": require_redis(), "key_prefix": prefix},
        }
    return {
        "class": "modules::queue::RabbitMQAdapter",
        "config": {**common, "amqp_url": require_rabbitmq()},
    }


async def _cleanup(kind: str, prefix: str, topic: str) -> None:
    if kind == "redis":
        from tests.modules.test_queue import delete_redis_prefix

        await delete_redis_prefix(prefix)
    elif kind == "rabbitmq":
        from tests.modules.test_queue import delete_rabbit_topology

        await delete_rabbit_topology([topic])


@pytest.mark.parametrize(
    "kind",
    [
        "file",
        pytest.param("redis", marks=pytest.mark.services),
        pytest.param("rabbitmq", marks=pytest.mark.services),
    ],
)
async def test_engine_kill9_with_jobs_pending_loses_nothing(kind: str, tmp_path: Path) -> None:
    topic = f"crash{uuid.uuid4().hex[:8]}"
    prefix = f"iiitest:{uuid.uuid4().hex[:8]}:"
    config = {
        "modules": [
            {
                "class": "modules::queue::QueueModule",
                "config": {"adapter": _adapter_for(kind, tmp_path, prefix)},
            }
        ]
    }
    engine = EngineProcess.write(tmp_path, config)
    engine.start()
    total = 30
    try:
        await engine.started()
        env = {"TOPIC": topic, "CONCURRENCY": "2"}
        async with start_sdk_worker("0.4.1", WORKER_041, url=engine.url, env=env) as worker:
            await worker.wait_for("READY")
            for i in range(total):
                line = await command(
                    worker,
                    op="call",
                    fn="enqueue",
                    data={"topic": topic, "data": {"i": i, "slow": 0.2}},
                )
                assert line == "OK null", line  # acknowledged = durable
            done = {d["i"] for d in await collect(worker, "DONE ", 3)}
            engine.kill()  # kill -9 with jobs waiting and two in flight
            engine.start()
            await engine.started()
            # The SDK reconnects and re-registers its trigger; everything not
            # acknowledged before the kill comes (again).
            with trio.fail_after(90):
                while len(done) < total:
                    line = await worker.wait_for("DONE ", timeout=90)
                    done.add(json.loads(line[5:])["i"])
            assert done == set(range(total))
    finally:
        engine.kill()
        await _cleanup(kind, prefix, topic)


@pytest.mark.services
async def test_two_engines_on_one_redis_share_jobs_and_cron_ticks(tmp_path: Path) -> None:
    redis_url = require_redis()
    topic = f"shared{uuid.uuid4().hex[:8]}"
    prefix = f"iiitest:{uuid.uuid4().hex[:8]}:"
    modules = [
        {
            "class": "modules::queue::QueueModule",
            "config": {
                "adapter": {
                    "class": "modules::queue::RedisAdapter",
                    "config": {
                        "redis_url": redis_url,
                        "key_prefix": prefix,
                        "poll_interval_ms": 20,
                    },
                }
            },
        },
        {
            "class": "modules::cron::CronModule",
            "config": {
                "adapter": {
                    "class": "modules::cron::RedisCronAdapter",
                    "config": {"redis_url": redis_url, "key_prefix": prefix},
                }
            },
        },
    ]
    engines = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        engines.append(EngineProcess.write(directory, {"modules": modules}))
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            await engine.started()
        env = {"TOPIC": topic, "CRON": "* * * * * *", "CONCURRENCY": "4"}
        async with (
            start_sdk_worker("0.4.1", WORKER_041, url=engines[0].url, env=env) as wa,
            start_sdk_worker("0.4.1", WORKER_041, url=engines[1].url, env=env) as wb,
        ):
            await wa.wait_for("READY")
            await wb.wait_for("READY")
            total = 40
            for i in range(total):
                assert (
                    await command(
                        wa if i % 2 else wb,
                        op="call",
                        fn="enqueue",
                        data={"topic": topic, "data": {"i": i, "slow": 0.05}},
                    )
                    == "OK null"
                )
            # Read both workers until every job is done and two ticks came (no
            # fixed wait: a slow machine only takes longer).
            lines_a: list[str] = []
            lines_b: list[str] = []
            enough = trio.Event()

            def complete() -> bool:
                both = lines_a + lines_b
                done = {json.loads(line[5:])["i"] for line in both if line.startswith("DONE ")}
                return len(done) == total and sum(line.startswith("TICK ") for line in both) >= 2

            async def read(worker: Any, into: list[str]) -> None:
                into.extend(worker.seen)
                worker.seen.clear()
                if complete():
                    enough.set()
                async for line in worker.lines:
                    into.append(line)
                    if complete():
                        enough.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, wa, lines_a)
                nursery.start_soon(read, wb, lines_b)
                with trio.fail_after(90):
                    await enough.wait()
                nursery.cancel_scope.cancel()
            jobs = [
                json.loads(line[5:])["i"] for line in lines_a + lines_b if line.startswith("DONE ")
            ]
            assert sorted(jobs) == list(range(total)), jobs  # each job once
            assert any(line.startswith("DONE ") for line in lines_a) and any(
                line.startswith("DONE ") for line in lines_b
            )
            ticks = [line[5:] for line in lines_a + lines_b if line.startswith("TICK ")]
            assert len(ticks) >= 2
            assert len(ticks) == len(set(ticks)), ticks  # each scheduled second fired once
    finally:
        for engine in engines:
            engine.kill()
        from tests.modules.test_queue import delete_redis_prefix

        await delete_redis_prefix(prefix)
