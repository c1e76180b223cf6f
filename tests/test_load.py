"""Load and fault tests: bounded in time, loopback only.

* **Soak.** 50 workers connect, register, serve and disconnect in a loop (one
  in five leaves abruptly with calls unanswered) while 8 callers invoke
  continuously; 10 stable workers keep every function id routable.  Every
  call is answered with a result, ``invocation_stopped`` or ``timeout``; the
  trio task count and the RSS of the last third of the run do not grow past
  the first third's; afterwards nothing is left pending.
* **Slow consumer.** A worker that stops reading is dropped once its send
  queue has stayed full for ``slow_consumer_timeout``; meanwhile another
  worker's calls keep being answered, and the calls routed to the slow one end
  ``invocation_stopped``.

Figures are printed (``-s`` shows them); the assertions are about outcomes
and resources, never about time.  ``III_SOAK_SECONDS`` sets the soak length
(default 24 s).
"""

from __future__ import annotations

import collections
import os
import random
import statistics
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from iii.testing import RawWorker, make_config, open_test_engine

pytestmark = pytest.mark.load

SOAK_SECONDS = float(os.environ.get("III_SOAK_SECONDS", "24"))
FUNCTIONS = 10
CHURNERS = 50
CALLERS = 8
INVOCATION_TIMEOUT = 2.0
FLOOD = 96


@asynccontextmanager
async def loopback_worker(
    port: int, *, message_queue_size: int = 1
) -> AsyncIterator[tuple[RawWorker, trio.SocketStream]]:
    """A raw worker over a TCP socket this helper owns (and always closes)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            "127.0.0.1",
            "/",
            message_queue_size=message_queue_size,
            max_message_size=64 * 2**20,
        )
        worker = RawWorker(ws)
        registered = await worker.receive(timeout=10)
        worker.worker_id = registered["worker_id"]
        try:
            yield worker, stream
        finally:
            nursery.cancel_scope.cancel()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trio_task_count() -> int:
    stack = [trio.lowlevel.current_root_task()]
    count = 0
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def answer_calls(
    worker: RawWorker, *, drop_after: float | None = None, delay: float = 0.0
) -> None:
    """Answer invocations until cancelled (or, with ``drop_after``, stop reading)."""
    rng = random.Random()
    while True:
        try:
            message = await worker.receive_type("invokefunction", timeout=3600)
        except ConnectionClosed:
            return
        if delay:
            await trio.sleep(rng.uniform(0, delay))
        try:
            await worker.send(
                {
                    "type": "invocationresult",
                    "invocation_id": message["invocation_id"],
                    "function_id": message["function_id"],
                    "result": {"by": worker.worker_id},
                }
            )
        except ConnectionClosed:
            return


async def test_soak_churning_workers_and_continuous_callers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_config(invocation_timeout_ms=int(INVOCATION_TIMEOUT * 1000))
    outcomes: collections.Counter[str] = collections.Counter()
    connects = collections.Counter[str]()
    samples: list[tuple[float, int, int]] = []
    unexpected: list[Any] = []
    stop = trio.Event()
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None

        async def stable(
            index: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            async with loopback_worker(port) as (worker, _):
                await worker.send({"type": "registerfunction", "id": f"soak::f{index}"})
                await worker.call("engine::functions::list", {})
                task_status.started()
                await answer_calls(worker)

        async def churner(index: int) -> None:
            rng = random.Random(index)
            while not stop.is_set():
                async with loopback_worker(port) as (worker, stream):
                    connects["churn"] += 1
                    await worker.send(
                        {"type": "registerfunction", "id": f"soak::f{index % FUNCTIONS}"}
                    )
                    with trio.move_on_after(rng.uniform(0.05, 0.4)):
                        await answer_calls(worker, delay=0.02)
                    if rng.random() < 0.2:
                        connects["abrupt"] += 1
                        await trio.aclose_forcefully(stream)  # calls in flight are left unanswered
                    else:
                        with trio.move_on_after(2):
                            await worker.ws.aclose()

        async def caller(index: int) -> None:
            rng = random.Random(1000 + index)
            async with loopback_worker(port) as (worker, _):
                while not stop.is_set():
                    function_id = f"soak::f{rng.randrange(FUNCTIONS)}"
                    try:
                        answer = await worker.call(
                            function_id, {"i": index}, timeout=INVOCATION_TIMEOUT + 10
                        )
                    except trio.TooSlowError:
                        outcomes["unanswered"] += 1
                        continue
                    if "error" not in answer:
                        outcomes["result"] += 1
                    elif answer["error"]["code"] in ("invocation_stopped", "timeout"):
                        outcomes[answer["error"]["code"]] += 1
                    else:
                        outcomes["other"] += 1
                        unexpected.append(answer)

        async def sample() -> None:
            start = trio.current_time()
            while True:
                samples.append((trio.current_time() - start, trio_task_count(), rss_bytes()))
                await trio.sleep(0.5)

        async with trio.open_nursery() as load_nursery:
            for index in range(FUNCTIONS):
                await load_nursery.start(stable, index)
            load_nursery.start_soon(sample)
            async with trio.open_nursery() as run_nursery:
                for index in range(CHURNERS):
                    run_nursery.start_soon(churner, index)
                for index in range(CALLERS):
                    run_nursery.start_soon(caller, index)
                await trio.sleep(SOAK_SECONDS)
                stop.set()
            load_nursery.cancel_scope.cancel()

        with trio.fail_after(10):
            while engine.connections or len(engine.pending) or engine.inflight:
                await trio.sleep(0.05)
        leftovers = {
            fid: entry
            for fid, entry in engine.registry.functions.items()
            if fid.startswith("soak::")
        }

    third = SOAK_SECONDS / 3
    first = [s for s in samples if s[0] <= third]
    last = [s for s in samples if s[0] >= 2 * third]
    tasks_first, tasks_last = (
        statistics.mean(s[1] for s in first),
        statistics.mean(s[1] for s in last),
    )
    rss_first, rss_last = (
        statistics.median(s[2] for s in first),
        statistics.median(s[2] for s in last),
    )
    with capsys.disabled():
        print(
            f"\nsoak {SOAK_SECONDS:g}s: {sum(outcomes.values())} calls {dict(outcomes)}; "
            f"{connects['churn']} worker connections ({connects['abrupt']} abrupt); "
            f"trio tasks {tasks_first:.0f} -> {tasks_last:.0f}; "
            f"RSS {rss_first / 2**20:.1f} -> {rss_last / 2**20:.1f} MiB"
        )
    assert not unexpected, unexpected[:5]
    assert outcomes["unanswered"] == 0
    assert outcomes["result"] > 0 and outcomes["invocation_stopped"] > 0
    assert connects["churn"] >= CHURNERS * 2
    assert not leftovers
    assert tasks_last <= tasks_first * 1.25 + 25
    assert rss_last - rss_first < 32 * 2**20


async def test_slow_consumer_is_dropped_without_blocking_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(send_queue_size=8, slow_consumer_timeout_ms=500)
    payload = {"blob": "x" * (256 * 1024)}
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        async with (
            loopback_worker(port) as (slow, _),
            loopback_worker(port) as (fast, _),
            loopback_worker(port) as (caller, _),
            loopback_worker(port) as (other_caller, _),
        ):
            await slow.send({"type": "registerfunction", "id": "slow::f"})
            await fast.send({"type": "registerfunction", "id": "fast::f"})
            await caller.call("engine::functions::list", {})
            # ``slow`` never reads again: its socket buffers and then its send queue fill up.
            slow_outcomes: collections.Counter[str] = collections.Counter()
            fast_answers = 0

            async def collect_slow_results() -> None:
                # One reader for the caller's socket (RawWorker.call is sequential).
                while sum(slow_outcomes.values()) < FLOOD:
                    answer = await caller.receive_type("invocationresult", timeout=60)
                    slow_outcomes[answer.get("error", {}).get("code", "result")] += 1

            async def fast_traffic() -> None:
                # While the slow worker backs up, other traffic flows.
                nonlocal fast_answers
                while slow.worker_id in engine.connections:
                    answer = await other_caller.call("fast::f", {}, timeout=5)
                    assert answer["result"] == {"by": fast.worker_id}
                    fast_answers += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_calls, fast)
                with trio.fail_after(60):
                    async with trio.open_nursery() as flood_nursery:
                        flood_nursery.start_soon(collect_slow_results)
                        flood_nursery.start_soon(fast_traffic)
                        for _ in range(FLOOD):
                            await caller.send(
                                {
                                    "type": "invokefunction",
                                    "function_id": "slow::f",
                                    "data": payload,
                                    "invocation_id": str(uuid.uuid4()),
                                }
                            )
                nursery.cancel_scope.cancel()
        # Calls queued for it end invocation_stopped; any sent after the drop find no function.
        assert sum(slow_outcomes.values()) == FLOOD
        assert set(slow_outcomes) <= {"invocation_stopped", "function_not_found"}, slow_outcomes
        assert slow_outcomes["invocation_stopped"] > 0
        assert fast_answers > 0
        assert any("slow consumer" in record.getMessage() for record in caplog.records)
        assert "slow::f" not in engine.registry.functions
        print(
            f"\nslow consumer: {dict(slow_outcomes)} of {FLOOD} calls of 256 KiB; {fast_answers} fast calls answered meanwhile"
        )
