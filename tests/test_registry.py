"""The replica policy of iii.registry: fewest pending on the worker, then longest waiting."""

from __future__ import annotations

import itertools

from iii.invocations import Invocation, PendingTable
from iii.registry import FunctionRegistration, Registry, WorkerInfo

_ids = itertools.count()


def make(replicas: int) -> tuple[Registry, PendingTable]:
    registry = Registry()
    pending = PendingTable(on_load=registry.set_pending)
    for i in range(replicas):
        registry.add_worker(WorkerInfo(id=f"w{i}"))
        registry.add_function(FunctionRegistration(function_id="f", owner=f"w{i}"))
    return registry, pending


def file_call(pending: PendingTable, target: str) -> Invocation:
    invocation = Invocation(invocation_id=str(next(_ids)), function_id="f", target_worker_id=target)
    pending.add(invocation)
    return invocation


def test_equal_replicas_take_turns_in_the_order_they_joined():
    registry, _ = make(3)
    entry = registry.functions["f"]
    # Nothing is filed (an engine-side handler): only the pick moves a replica back.
    assert [entry.pick().owner for _ in range(7)] == ["w0", "w1", "w2", "w0", "w1", "w2", "w0"]


def test_the_replica_with_fewest_pending_wins_and_a_finished_call_brings_it_back():
    registry, pending = make(3)
    entry = registry.functions["f"]
    calls = {}
    for _ in range(3):
        replica = entry.pick()
        calls[replica.owner] = file_call(pending, replica.owner)  # type: ignore[arg-type]
    assert set(calls) == {"w0", "w1", "w2"}
    pending.discard(calls["w1"])  # w1 is idle again, the others have one each
    assert entry.pick().owner == "w1"
    # Load on another function counts: w1 now busy elsewhere.
    registry.add_function(FunctionRegistration(function_id="g", owner="w1"))
    other = Invocation(invocation_id="g1", function_id="g", target_worker_id="w1")
    pending.add(other)
    pending.add(Invocation(invocation_id="g2", function_id="g", target_worker_id="w1"))
    pending.discard(calls["w0"])
    assert entry.pick().owner == "w0"


def test_queues_exist_only_while_a_function_is_shared_and_follow_leaving_workers():
    registry, pending = make(2)
    entry = registry.functions["f"]
    assert entry.queues is not None
    file_call(pending, "w0")
    registry.remove_worker("w1")
    assert entry.queues is None and entry.pick().owner == "w0"
    registry.add_worker(WorkerInfo(id="w2"))
    registry.add_function(FunctionRegistration(function_id="f", owner="w2"))
    assert entry.queues is not None and entry.queues.load == {"w0": 1, "w2": 0}
    assert entry.pick().owner == "w2"


def test_a_peers_replica_is_weighed_by_its_load_plus_one_and_takes_turns_on_ties():
    """The cluster's pick: a peer engine's pseudo worker (``remote``) has its
    calls in flight plus one set as its load, so an idle local replica wins."""
    registry = Registry()
    pending = PendingTable(on_load=registry.set_pending)
    registry.add_worker(WorkerInfo(id="w0"))
    for peer in ("p1", "p2"):
        registry.add_worker(WorkerInfo(id=peer, remote=True))
        registry.set_load(peer, 1)  # idle peer: 0 in flight, plus one
    for owner in ("w0", "p1", "p2"):
        registry.add_function(FunctionRegistration(function_id="f", owner=owner))
    entry = registry.functions["f"]
    assert [entry.pick().owner for _ in range(3)] == ["w0"] * 3  # idle local first
    call = file_call(pending, "w0")  # w0 busy with one: all three at 1, oldest place first
    assert [entry.pick().owner for _ in range(4)] == ["p1", "p2", "w0", "p1"]
    # a forwarded call (local only) never goes to a peer
    assert {entry.pick_local(lambda owner: owner in ("p1", "p2")).owner for _ in range(3)} == {"w0"}
    registry.set_load("p2", 3)  # two in flight to p2
    pending.discard(call)
    assert [entry.pick().owner for _ in range(3)] == ["w0"] * 3
    registry.set_load("w0", 5)
    assert [entry.pick().owner for _ in range(3)] == ["p1"] * 3
    assert entry.queues is not None and entry.queues.waiting_order()[-1] == "w0"
    registry.remove_worker("w0")
    assert entry.pick_local(lambda owner: owner in ("p1", "p2")) is None
    registry.remove_worker("p2")
    assert entry.queues is None
    assert entry.pick_local(lambda owner: owner == "p1") is None
    assert entry.pick().owner == "p1"
