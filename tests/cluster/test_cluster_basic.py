"""Engines in one trio run on one Redis: membership, one function space, failure."""

from __future__ import annotations

import uuid

import trio

from iii.testing import connect_loopback_worker, connect_test_worker
from tests.cluster.helpers import cluster_of, open_cluster, sees_function, wait_for


async def serve_echo(worker, function_id: str, count: int | None = None) -> None:
    served = 0
    while count is None or served < count:
        message = await worker.receive_type("invokefunction", timeout=30)
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": function_id,
                "result": {"echo": message["data"], "worker": worker.worker_id},
            }
        )
        served += 1


async def test_a_function_on_one_engine_is_called_from_another() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::echo"})
            await wait_for(lambda: sees_function(a, "t::echo"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_echo, worker, "t::echo", 1)
                answer = await caller.call("t::echo", {"x": 1})
            assert answer.get("error") is None, answer
            assert answer["result"]["echo"]["x"] == 1
            assert answer["result"]["worker"] == worker.worker_id
            await worker.send({"type": "unregisterfunction", "id": "t::echo"})
            await wait_for(lambda: not sees_function(a, "t::echo"))
            gone = await caller.call("t::echo", {"x": 2})
            assert gone["error"]["code"] == "function_not_found"


async def test_a_call_in_flight_to_a_leaving_engine_ends_invocation_stopped() -> None:
    async with open_cluster(2, shutdown_grace_ms=100) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::slow"})
            await wait_for(lambda: sees_function(a, "t::slow"))
            await caller.send({"type": "invokefunction", "function_id": "t::slow", "data": {}, "invocation_id": str(uuid.uuid4())})
            await worker.receive_type("invokefunction")  # it arrived; never answered
            b.request_shutdown()
            answer = await caller.receive_type("invocationresult", timeout=10)
            assert answer["error"]["code"] == "invocation_stopped", answer
            await wait_for(lambda: not sees_function(a, "t::slow"))
