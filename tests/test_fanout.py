"""The one bounded fan-out (iii/fanout.py): bounded queue and concurrency, order, containment."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from iii.fanout import FanOut


async def test_at_most_queue_size_wait_and_concurrency_run() -> None:
    release = trio.Event()
    started: list[int] = []
    most_running = 0

    async def handle(item: int) -> None:
        nonlocal most_running
        started.append(item)
        most_running = max(most_running, fan.running)
        await release.wait()

    fan: FanOut[int] = FanOut(handle, str, queue_size=5, concurrency=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fan.run)
        await trio.testing.wait_all_tasks_blocked()
        accepted = [fan.offer(n) for n in range(20)]
        # One went straight to the waiting runner, five fill the queue.
        assert accepted == [True] * 6 + [False] * 14 and fan.dropped == 14
        await trio.testing.wait_all_tasks_blocked()
        # Three run; the runner takes the next only when a slot frees: three queued.
        assert started == [0, 1, 2] and fan.running == 3 and fan.queued == 3
        assert [fan.offer(n) for n in range(20, 25)] == [True] * 2 + [False] * 3
        assert fan.queued == 5
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert started == [0, 1, 2, 3, 4, 5, 20, 21]  # in the order offered
        assert most_running == 3 and fan.running == 0
        nursery.cancel_scope.cancel()


async def test_a_failing_item_ends_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    done: list[int] = []

    async def handle(item: int) -> None:
        if item == 2:
            raise ValueError("boom")
        done.append(item)

    fan: FanOut[int] = FanOut(handle, lambda n: f"item {n}", queue_size=10, concurrency=2)
    with caplog.at_level(logging.ERROR):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fan.run)
            for n in range(5):
                assert fan.offer(n)
            await trio.testing.wait_all_tasks_blocked()
            fan.close()
    assert sorted(done) == [0, 1, 3, 4]
    assert any("item 2" in record.getMessage() for record in caplog.records)
    assert not fan.offer(9)  # closed


async def test_cancelling_the_runner_cancels_the_handlers_in_flight() -> None:
    cancelled = 0

    async def handle(item: int) -> None:
        nonlocal cancelled
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled += 1
            raise

    fan: FanOut[int] = FanOut(handle, str, queue_size=10, concurrency=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fan.run)
        for n in range(6):
            fan.offer(n)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert cancelled == 4
