"""A worker's call relayed to a peer engine (iii.cluster.relay): the slow path's guarantees.

Engines in one trio run on one Redis; the caller is on engine A, the
function's worker on engine B.  Each test checks what the caller gets and
that A holds nothing of the call afterwards (pending table, counts).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from iii.engine import Engine
from iii.grants import Grant
from iii.testing import RawWorker, connect_test_worker
from tests.cluster.helpers import cluster_of, open_cluster, sees_function, wait_for

pytestmark = pytest.mark.services  # the engines meet through Redis


def invoke(function_id: str, data: Any = None) -> dict[str, Any]:
    return {
        "type": "invokefunction",
        "function_id": function_id,
        "data": {} if data is None else data,
        "invocation_id": str(uuid.uuid4()),
    }


def holds_nothing(a: Engine, caller: RawWorker) -> bool:
    """A keeps no trace of the caller's relayed calls (A's ``inflight`` also
    counts the peer's catalog long poll, so it is not checked here)."""
    connection = a.connections.get(caller.worker_id)
    peers = cluster_of(a).peers.values()
    return (
        not any(i.caller_worker_id == caller.worker_id for i in a.pending.by_id.values())
        and all(peer.inflight == 0 for peer in peers)
        and (connection is None or (connection.calls_outstanding == 0 and not connection.relayed))
    )


async def answer(worker: RawWorker, message: dict[str, Any], result: Any) -> None:
    await worker.send(
        {
            "type": "invocationresult",
            "invocation_id": message["invocation_id"],
            "function_id": message["function_id"],
            "result": result,
        }
    )


async def test_a_relayed_call_is_answered_with_the_caller_s_id_and_context() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::echo"})
            await wait_for(lambda: sees_function(a, "t::echo"))
            call = invoke("t::echo", {"x": 1})
            call["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            call["baggage"] = "k=v"
            await caller.send(call)
            arrived = await worker.receive_type("invokefunction")
            # Relayed: no task on A, the call filed for A's caller.
            assert len(a.connections[caller.worker_id].relayed) == 1
            # (B names its caller: the link; as on the path with a task on A.)
            assert arrived["data"]["x"] == 1 and "_caller_worker_id" in arrived["data"]
            assert arrived["traceparent"] == call["traceparent"]
            assert arrived["baggage"] == "k=v"
            await answer(worker, arrived, {"y": 2})
            result = await caller.receive_type("invocationresult")
            assert result["invocation_id"] == call["invocation_id"]
            assert result["function_id"] == "t::echo"
            assert result["result"] == {"y": 2}
            assert result["traceparent"] == call["traceparent"]
            assert result["baggage"] == "k=v"
            await wait_for(lambda: holds_nothing(a, caller))


async def test_the_peer_s_error_reaches_the_caller_as_is() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::fails"})
            await wait_for(lambda: sees_function(a, "t::fails"))
            await caller.send(invoke("t::fails"))
            arrived = await worker.receive_type("invokefunction")
            await worker.send(
                {
                    "type": "invocationresult",
                    "invocation_id": arrived["invocation_id"],
                    "function_id": "t::fails",
                    "error": {"code": "my_code", "message": "it failed", "stacktrace": "at x"},
                }
            )
            result = await caller.receive_type("invocationresult")
            assert result["error"] == {
                "code": "my_code",
                "message": "it failed",
                "stacktrace": "at x",
            }
            await wait_for(lambda: holds_nothing(a, caller))


async def test_a_caller_that_leaves_mid_call_leaves_nothing_behind() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker:
            await worker.send({"type": "registerfunction", "id": "t::slow"})
            await wait_for(lambda: sees_function(a, "t::slow"))
            async with connect_test_worker(a) as caller:
                await caller.send(invoke("t::slow"))
                arrived = await worker.receive_type("invokefunction")
                assert len(a.connections[caller.worker_id].relayed) == 1
            await wait_for(lambda: holds_nothing(a, caller))
            await answer(worker, arrived, "late")  # ignored on A
            async with connect_test_worker(a) as again:
                await again.send(invoke("t::slow"))
                arrived = await worker.receive_type("invokefunction")
                await answer(worker, arrived, "fresh")
                result = await again.receive_type("invocationresult")
                assert result["result"] == "fresh"
                await wait_for(lambda: holds_nothing(a, again))


async def test_a_relayed_call_times_out_at_the_engine_s_deadline() -> None:
    async with open_cluster(2, invocation_timeout_ms=300) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::never"})
            await wait_for(lambda: sees_function(a, "t::never"))
            await caller.send(invoke("t::never"))
            await worker.receive_type("invokefunction")  # never answered
            result = await caller.receive_type("invocationresult", timeout=10)
            assert result["error"]["code"] == "timeout", result
            assert "t::never" in result["error"]["message"]
            await wait_for(lambda: holds_nothing(a, caller))


async def test_a_link_that_drops_mid_call_ends_it_invocation_stopped() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::slow"})
            await wait_for(lambda: sees_function(a, "t::slow"))
            await caller.send(invoke("t::slow"))
            await worker.receive_type("invokefunction")
            peer = cluster_of(a).peers[cluster_of(b).engine_id]
            connection = peer.link._connection
            assert connection is not None
            connection.abort("the test cut the link")
            result = await caller.receive_type("invocationresult", timeout=10)
            assert result["error"]["code"] == "invocation_stopped", result
            await wait_for(lambda: holds_nothing(a, caller))


async def test_grant_and_max_pending_invocations_still_refuse_a_relayed_call() -> None:
    # 2: the peer's link on each engine has its catalog long poll outstanding,
    # and one call forwarded.  The caller's other call is to a worker on A.
    async with open_cluster(2, max_pending_invocations=2) as (a, b):
        async with (
            connect_test_worker(b) as worker,
            connect_test_worker(a) as local,
            connect_test_worker(a) as caller,
        ):
            await worker.send({"type": "registerfunction", "id": "t::slow"})
            await local.send({"type": "registerfunction", "id": "t::local"})
            await wait_for(lambda: sees_function(a, "t::slow") and sees_function(a, "t::local"))
            calls = [invoke("t::slow"), invoke("t::local")]
            for call in calls:
                await caller.send(call)
            arrived = [
                await worker.receive_type("invokefunction"),
                await local.receive_type("invokefunction"),
            ]
            await caller.send(invoke("t::slow"))
            refused = await caller.receive_type("invocationresult")
            assert refused["error"]["code"] == "too_many_pending_invocations", refused
            await answer(worker, arrived[0], 1)
            await answer(local, arrived[1], 1)
            results = [await caller.receive_type("invocationresult") for _ in calls]
            assert {r["invocation_id"] for r in results} == {c["invocation_id"] for c in calls}
            assert all(r["result"] == 1 for r in results)
            await wait_for(lambda: holds_nothing(a, caller))
            a.connections[caller.worker_id].grant = Grant.from_patterns(
                "narrow", invoke=["other::*"]
            )
            await caller.send(invoke("t::slow"))
            refused = await caller.receive_type("invocationresult")
            assert refused["error"]["code"] == "forbidden", refused
            assert holds_nothing(a, caller)


async def test_an_answer_too_large_for_the_caller_becomes_payload_too_large() -> None:
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::big"})
            await wait_for(lambda: sees_function(a, "t::big"))
            await caller.send(invoke("t::big"))
            arrived = await worker.receive_type("invokefunction")
            # Over the caller's 1 MiB frames (it never said it takes more).
            await answer(worker, arrived, "x" * (1024 * 1024 + 10))
            result = await caller.receive_type("invocationresult", timeout=10)
            assert result["error"]["code"] == "payload_too_large", result
            await wait_for(lambda: holds_nothing(a, caller))


async def test_relayed_calls_count_in_the_peer_s_load() -> None:
    # The cluster pick weighs a peer's replica by its calls in flight + 1;
    # relayed calls must count there as forwarded ones do.
    async with open_cluster(2) as (a, b):
        async with connect_test_worker(b) as worker, connect_test_worker(a) as caller:
            await worker.send({"type": "registerfunction", "id": "t::held"})
            await wait_for(lambda: sees_function(a, "t::held"))
            peer = next(iter(cluster_of(a).peers.values()))
            assert a.registry.load_of(peer.owner_id) == 1
            held = [invoke("t::held") for _ in range(2)]
            for message in held:
                await caller.send(message)
            arrived = [await worker.receive_type("invokefunction") for _ in held]
            assert len(a.connections[caller.worker_id].relayed) == 2
            assert a.registry.load_of(peer.owner_id) == 3
            for message in arrived:
                await answer(worker, message, "done")
            for _ in held:
                await caller.receive_type("invocationresult")
            await wait_for(lambda: holds_nothing(a, caller))
            assert a.registry.load_of(peer.owner_id) == 1
