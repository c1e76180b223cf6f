"""A property over membership changes: engines join and leave while calls run; every call is answered once.

One engine (A) stays; a caller on it keeps calls in flight to ``p::f``.
Hypothesis picks a sequence of joins (a new engine with a worker serving
``p::f``) and leaves (a graceful shutdown with a tiny grace, so calls in
flight to it are cut) and batches of calls.  Every call must get exactly one
``invocationresult``: the worker's answer, or ``invocation_stopped`` (its
engine left mid-call) or ``function_not_found`` (no engine had it then).
One trio run per example (no hypothesis-trio).
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from iii.engine import Engine
from iii.serve import serve_engine
from iii.testing import RawWorker, connect_test_worker
from tests.cluster.helpers import cluster_config, new_cluster_name, wait_for
from tests.support import require_redis

pytestmark = pytest.mark.services

ALLOWED_ERRORS = {"invocation_stopped", "function_not_found"}

operations = st.lists(
    st.one_of(
        st.tuples(st.just("join")),
        st.tuples(st.just("leave"), st.integers(0, 3)),
        st.tuples(st.just("calls"), st.integers(1, 8)),
    ),
    min_size=2,
    max_size=7,
)


async def serve_calls(worker: RawWorker, slow: trio.Event) -> None:
    while True:
        try:
            message = await worker.receive_type("invokefunction", timeout=3600)
        except ConnectionClosed:
            return  # its engine left
        if message["data"].get("slow"):
            slow.set()
            continue  # never answered: only its engine leaving ends it
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": message["function_id"],
                "result": {"n": message["data"]["n"]},
            }
        )


async def scenario(ops: list[tuple[Any, ...]]) -> None:
    name = new_cluster_name()
    config = cluster_config(name, dead_after_ms=600, shutdown_grace_ms=20)
    answers: Counter[str] = Counter()
    results: dict[str, Any] = {}
    sent: list[str] = []
    async with trio.open_nursery() as nursery:
        a: Engine = await nursery.start(
            lambda task_status: serve_engine(config, handle_signals=False, task_status=task_status)
        )
        live: list[tuple[Engine, trio.CancelScope]] = []
        async with connect_test_worker(a) as caller:

            async def collect() -> None:
                while True:
                    message = await caller.receive_type("invocationresult", timeout=3600)
                    answers[message["invocation_id"]] += 1
                    results[message["invocation_id"]] = message

            nursery.start_soon(collect)

            async def join() -> None:
                scope = trio.CancelScope()

                async def run_engine(task_status: trio.TaskStatus[Engine]) -> None:
                    with scope:
                        engine: Engine = await nursery.start(
                            lambda task_status: serve_engine(
                                config, handle_signals=False, task_status=task_status
                            )
                        )
                        async with connect_test_worker(engine) as worker:
                            await worker.send({"type": "registerfunction", "id": "p::f"})
                            slow = trio.Event()
                            async with trio.open_nursery() as serving:
                                serving.start_soon(serve_calls, worker, slow)
                                task_status.started(engine)
                                await trio.sleep_forever()

                engine = await nursery.start(run_engine)
                live.append((engine, scope))
                assert engine.cluster is not None
                engine_id = engine.cluster.engine_id
                await wait_for(
                    lambda: (
                        a.cluster is not None
                        and engine_id in a.cluster.peers
                        and a.cluster.peers[engine_id].catalog is not None
                        and "p::f" in a.cluster.peers[engine_id].catalog.functions
                    ),  # type: ignore[union-attr]
                    timeout=20,
                )

            async def call(n: int, slow: bool = False) -> None:
                invocation_id = str(uuid.uuid4())
                sent.append(invocation_id)
                await caller.send(
                    {
                        "type": "invokefunction",
                        "function_id": "p::f",
                        "data": {"n": n, "slow": slow},
                        "invocation_id": invocation_id,
                    }
                )

            counter = 0
            for op in ops:
                if op[0] == "join":
                    await join()
                elif op[0] == "leave" and live:
                    engine, scope = live.pop(op[1] % len(live))
                    await call(-1, slow=True)  # likely in flight to a leaving engine
                    engine.request_shutdown()
                    with trio.move_on_after(10):
                        await wait_for(lambda e=engine: e.connection_nursery is None, timeout=10)
                    scope.cancel()
                elif op[0] == "calls":
                    for _ in range(op[1]):
                        counter += 1
                        await call(counter)
            for engine, _ in live:
                engine.request_shutdown()
            # Every call is answered: the slow ones when their engine leaves.
            with trio.fail_after(30):
                while any(answers[i] == 0 for i in sent):
                    await trio.sleep(0.02)
            for _, scope in live:
                scope.cancel()
            a.request_shutdown()
            nursery.cancel_scope.cancel()
    assert all(answers[i] == 1 for i in sent), answers
    for invocation_id in sent:
        message = results[invocation_id]
        error = message.get("error")
        if error is not None:
            assert error["code"] in ALLOWED_ERRORS, message
        else:
            assert isinstance(message["result"]["n"], int)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(operations)
def test_every_call_is_answered_once_while_engines_join_and_leave(
    ops: list[tuple[Any, ...]],
) -> None:
    require_redis()
    trio.run(scenario, ops)
