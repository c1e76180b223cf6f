"""One deadline mechanism for every call (iii.invocations, iii.routing): an
engine function and a worker's function past their deadline both end through
the pending table's heap and its one expiry task, and answer ``timeout``."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from iii.errors import InvocationTimeoutError
from iii.invocations import TIMED_OUT, Invocation, NativeCall, PendingTable
from iii.native import CallContext
from iii.routing import EXPIRY_RESOLUTION
from iii.testing import connect_test_worker, open_test_engine


async def _timed_out_at(engine, function_id: str, timeout: float, ended_at: dict[str, float]):
    with pytest.raises(InvocationTimeoutError) as raised:
        await engine.invoke(function_id, {}, timeout=timeout)
    assert raised.value.code == "timeout"
    assert str(raised.value.message) == f"Invocation of {function_id} timed out after {timeout:g}s"
    ended_at[function_id] = trio.current_time()


async def test_engine_and_worker_functions_past_their_deadline_time_out_through_one_heap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen_deadline: list[float] = []
    cancelled = trio.Event()

    async def never(data: object, ctx: CallContext) -> object:
        # The call's own scope has no deadline: the heap is what ends it.
        seen_deadline.append(trio.current_effective_deadline())
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with open_test_engine() as engine, connect_test_worker(engine) as owner:
        engine.register_function("demo::native_never", never)
        await owner.send({"type": "registerfunction", "id": "demo::worker_never"})
        with trio.fail_after(5):
            while "demo::worker_never" not in engine.registry.functions:
                await trio.sleep(0.01)
        ended_at: dict[str, float] = {}
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_timed_out_at, engine, "demo::native_never", 3.0, ended_at)
            nursery.start_soon(_timed_out_at, engine, "demo::worker_never", 3.0, ended_at)
            await trio.testing.wait_all_tasks_blocked()
            # Both deadlines are filed in the one heap, the expiry task sleeps until them.
            assert engine.pending.native_running == 1 and len(engine.pending) == 1
            assert engine.expiry_scope is not None
            assert engine.expiry_scope.deadline == pytest.approx(started + 3.0)
        assert seen_deadline == [math.inf] and cancelled.is_set()
        for at in ended_at.values():
            assert started + 3.0 <= at <= started + 3.0 + EXPIRY_RESOLUTION
        assert engine.pending.native_running == 0 and len(engine.pending) == 0


async def test_an_engine_function_that_answers_in_time_leaves_no_live_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def quick(data: object, ctx: CallContext) -> object:
        await trio.sleep(1.0)
        return data

    async with open_test_engine() as engine:
        engine.register_function("demo::quick", quick)
        assert await engine.invoke("demo::quick", 7, timeout=2.0) == 7
        assert engine.pending.native_running == 0
        await trio.sleep(5.0)  # past the deadline: the stale entry ends nothing
        assert engine.pending.expire(trio.current_time()) == []


async def test_a_caller_that_leaves_cancels_its_engine_function(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = trio.Event()

    async def never(data: object, ctx: CallContext) -> object:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with open_test_engine() as engine:
        engine.register_function("demo::never", never)
        with trio.move_on_after(1.0):
            await engine.invoke("demo::never", {}, timeout=60.0)
        assert cancelled.is_set() and engine.pending.native_running == 0


async def test_one_expire_ends_routed_and_native_calls_in_deadline_order() -> None:
    table = PendingTable()
    routed = Invocation(invocation_id="a", function_id="f", target_worker_id="w", deadline=2.0)
    table.add(routed)
    native = NativeCall("g", "b", 1.0)
    table.start_native(native)
    later = NativeCall("h", "c", 9.0)
    table.start_native(later)
    assert table.next_deadline == 1.0
    assert table.expire(5.0) == [native, routed]
    assert native.scope.cancel_called and routed.error is TIMED_OUT
    assert not later.scope.cancel_called
    table.end_native(later)
    assert table.expire(10.0) == []


async def test_the_heap_stays_small_when_engine_functions_end_before_their_deadline() -> None:
    table = PendingTable()
    for n in range(50_000):
        call = NativeCall("f", str(n), 1000.0 + n)
        table.start_native(call)
        table.end_native(call)
    assert table.native_running == 0
    assert len(table._deadlines) <= 1025
