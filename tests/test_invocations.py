"""The pending table's deadlines (iii.invocations): expiry and the heap's size."""

from __future__ import annotations

from iii.invocations import STOPPED, TIMED_OUT, Invocation, PendingTable


def file(table, invocation_id, deadline, target="w1"):
    invocation = Invocation(
        invocation_id=invocation_id, function_id="f", target_worker_id=target, deadline=deadline
    )
    table.add(invocation)
    return invocation


async def test_expire_resolves_only_calls_past_their_deadline():
    table = PendingTable()
    early, late = file(table, "a", 1.0), file(table, "b", 5.0)
    assert table.next_deadline == 1.0
    assert table.expire(0.5) == []
    assert table.expire(1.0) == [early]
    assert early.error is TIMED_OUT and early.done.is_set()
    assert not late.done.is_set()
    assert table.next_deadline == 5.0


async def test_a_call_answered_first_is_not_expired():
    table = PendingTable()
    stopped = file(table, "a", 1.0)
    table.stop_target("w1")
    assert table.expire(2.0) == []
    assert stopped.error is STOPPED


async def test_an_id_filed_again_keeps_its_own_deadline():
    table = PendingTable()
    first = file(table, "a", 1.0)
    table.discard(first)
    second = file(table, "a", 10.0)
    assert table.expire(2.0) == []  # the first filing's entry is stale
    assert not second.done.is_set()
    assert table.expire(10.0) == [second]


async def test_the_heap_stays_small_when_calls_end_before_their_deadline():
    table = PendingTable()
    for n in range(50_000):
        table.discard(file(table, str(n), 1000.0 + n))
    assert len(table) == 0
    assert len(table._deadlines) <= 2 * len(table) + 1025
