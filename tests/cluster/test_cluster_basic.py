"""Engines in one trio run on one Redis: membership, one function space, failure."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import trio

from iii.testing import connect_test_worker
from tests.cluster.helpers import cluster_of, open_cluster, sees_function, wait_for
from tests.modules.rest_api.helpers import add_route, open_worker, rest_module

# Cluster membership lives in Redis.
pytestmark = pytest.mark.services


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
            await caller.send(
                {
                    "type": "invokefunction",
                    "function_id": "t::slow",
                    "data": {},
                    "invocation_id": str(uuid.uuid4()),
                }
            )
            await worker.receive_type("invokefunction")  # it arrived; never answered
            b.request_shutdown()
            answer = await caller.receive_type("invocationresult", timeout=10)
            assert answer["error"]["code"] == "invocation_stopped", answer
            await wait_for(lambda: not sees_function(a, "t::slow"))


async def test_a_route_on_one_engine_is_served_by_every_engine_and_conflicts_cluster_wide() -> None:
    async with open_cluster(3, modules=[rest_module()]) as engines:
        a, b, c = engines
        async with open_worker(b, {"t::hello": hello}) as worker, connect_test_worker(c) as rival:
            await add_route(b, worker, "t::hello", "/hello/:name", "GET")
            routes_of = [e.modules["rest_api"].routes for e in engines]
            await wait_for(lambda: all(len(r) == 1 for r in routes_of))
            async with httpx.AsyncClient() as client:
                for engine in engines:
                    port = engine.modules["rest_api"].port
                    response = await client.get(f"http://127.0.0.1:{port}/hello/ann")
                    assert response.status_code == 200, response.text
                    assert response.json() == {"hi": "ann"}
            # Another function on the same route, on another engine: refused there.
            await rival.send({"type": "registerfunction", "id": "t::rival"})
            await rival.send(
                {
                    "type": "registertrigger",
                    "id": str(uuid.uuid4()),
                    "trigger_type": "http",
                    "function_id": "t::rival",
                    "config": {"api_path": "/hello/:who", "http_method": "GET"},
                }
            )
            result = await rival.receive_type("triggerregistrationresult")
            assert result.get("error") is not None, result
        # The worker left: its route vanishes everywhere.
        await wait_for(lambda: all(len(r) == 0 for r in routes_of))
        async with httpx.AsyncClient() as client:
            port = a.modules["rest_api"].port
            assert (await client.get(f"http://127.0.0.1:{port}/hello/ann")).status_code == 404


async def hello(data: Any) -> Any:
    return {"status_code": 200, "body": {"hi": data["path_params"]["name"]}}


async def test_introspection_lists_the_cluster_with_each_entry_s_engine() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::listed"})
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": "trig-1",
                    "trigger_type": "cron",
                    "function_id": "t::listed",
                    "config": {"expression": "0 0 1 1 * *"},
                }
            )
            await wait_for(lambda: sees_function(a, "t::listed"))
            b_id = cluster_of(b).engine_id
            functions = (await caller.call("engine::functions::list", {}))["result"]["functions"]
            (entry,) = [f for f in functions if f["function_id"] == "t::listed"]
            assert entry["engine"] == b_id and entry["engines"] == [b_id]
            workers = (await caller.call("engine::workers::list", {}))["result"]["workers"]
            engines_of = {w["id"]: w["engine"] for w in workers}
            assert engines_of[worker.worker_id] == b_id
            assert engines_of[caller.worker_id] == cluster_of(a).engine_id
            assert not any(w["id"].startswith("cluster:") for w in workers)
            local = (await caller.call("engine::workers::list", {"local_only": True}))["result"][
                "workers"
            ]
            assert {w["id"] for w in local} == {caller.worker_id}
            local_functions = (await caller.call("engine::functions::list", {"local_only": True}))[
                "result"
            ]
            assert "t::listed" not in {f["function_id"] for f in local_functions["functions"]}


async def test_an_idle_local_replica_is_preferred_and_a_busy_one_shares_with_the_peers() -> None:
    async with open_cluster(2) as (a, b):
        async with (
            connect_test_worker(a) as on_a,
            connect_test_worker(b) as on_b,
            connect_test_worker(a) as caller,
        ):
            for worker in (on_a, on_b):
                await worker.send({"type": "registerfunction", "id": "t::lb"})
            entry = None

            def both_replicas() -> bool:
                nonlocal entry
                entry = a.registry.functions.get("t::lb")
                return entry is not None and len(entry.replicas) == 2

            await wait_for(both_replicas)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_echo, on_a, "t::lb", 3)
                for n in range(3):  # A's replica is idle each time: it takes them all
                    answer = await caller.call("t::lb", {"n": n})
                    assert answer["result"]["worker"] == on_a.worker_id, answer
            # A's replica busy with one call: the peer's (0 in flight + 1) ties
            # and has waited longer, so it takes the next.
            held = str(uuid.uuid4())
            await caller.send(
                {
                    "type": "invokefunction",
                    "function_id": "t::lb",
                    "data": {},
                    "invocation_id": held,
                }
            )
            first = await on_a.receive_type("invokefunction", timeout=10)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_echo, on_b, "t::lb", 1)
                answer = await caller.call("t::lb", {"n": 9}, timeout=10)
            assert answer["result"]["worker"] == on_b.worker_id, answer
            await on_a.send(
                {
                    "type": "invocationresult",
                    "invocation_id": first["invocation_id"],
                    "function_id": "t::lb",
                    "result": {"done": True},
                }
            )
            assert (await caller.receive_type("invocationresult", timeout=10))["result"] == {
                "done": True
            }
