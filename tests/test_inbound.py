"""iii.inbound: the byte budget for peer data, and one connection's account of it."""

from __future__ import annotations

import math
from typing import Any

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from iii.inbound import InboundAccount, InboundBudget


def test_bytes_are_taken_while_they_fit() -> None:
    budget = InboundBudget(limit=100)
    a, b = object(), object()
    assert budget.try_take(a, 60)
    assert budget.try_take(b, 40)
    # Full: b is not the oldest receiver, so it does not go past the limit.
    assert not budget.try_take(b, 1)
    budget.give_back(40)
    assert budget.try_take(b, 40)
    assert budget.used == 100 and budget.peak == 100


def test_the_oldest_receiver_goes_past_the_limit_by_at_most_the_slack() -> None:
    budget = InboundBudget(limit=100, slack=50)
    a, b = object(), object()
    assert budget.try_take(a, 80)
    assert budget.try_take(b, 20)
    assert not budget.try_take(b, 10)  # b is not the oldest
    assert budget.try_take(a, 50)  # a is: up to limit + slack
    assert not budget.try_take(a, 1)  # and no further
    budget.done_receiving(a)
    assert budget.try_take(b, 0)  # b is the oldest now, but the slack is spent
    budget.give_back(130)
    assert budget.try_take(b, 10) and budget.used == 30


async def test_a_waiter_gets_room_when_bytes_come_back() -> None:
    budget = InboundBudget(limit=10)
    first, second = object(), object()
    assert budget.try_take(first, 10)
    got: list[bool] = []

    async def wait() -> None:
        got.append(await budget.take(second, 5, deadline=math.inf))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.statistics().waiting == 1
        budget.give_back(10)
    assert got == [True] and budget.used == 5


async def test_a_waiter_gets_room_when_the_oldest_receiver_is_done(autojump_clock: Any) -> None:
    budget = InboundBudget(limit=10, slack=10)
    first, second = object(), object()
    assert budget.try_take(first, 10)
    assert budget.try_take(second, 0)  # receiving, second in line
    got: list[bool] = []

    async def wait() -> None:
        got.append(await budget.take(second, 5, deadline=trio.current_time() + 60))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()  # it waits: no room yet
        assert got == []
        budget.done_receiving(first)  # its message is queued: second goes first now
    assert got == [True] and budget.used == 15


async def test_a_wait_ends_at_its_deadline(autojump_clock: Any) -> None:
    budget = InboundBudget(limit=10)
    assert budget.try_take(object(), 10)
    start = trio.current_time()
    assert not await budget.take(object(), 1, deadline=start + 3)
    assert trio.current_time() - start == 3
    assert budget.statistics().timed_out == 1 and budget.used == 10


def test_a_share_holds_at_most_its_limit_and_counts_in_its_parent() -> None:
    engine = InboundBudget(limit=100, slack=50)
    port = engine.share(30, slack=10)
    worker, client, other = object(), object(), object()
    assert port.try_take(client, 30)
    assert not port.try_take(other, 1)  # the share is full, the engine is not
    assert engine.try_take(worker, 70) and engine.used == 100 and port.used == 30
    port.give_back(30)
    assert engine.used == 70 and port.used == 0


async def test_a_share_waiter_wakes_when_its_parent_has_room_again() -> None:
    engine = InboundBudget(limit=100)
    port = engine.share(50, slack=0)
    worker, client = object(), object()
    assert engine.try_take(worker, 100)
    got: list[bool] = []

    async def wait() -> None:
        got.append(await port.take(client, 10, deadline=math.inf))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        engine.give_back(100)  # room in the parent: the share's waiter looks again
    assert got == [True] and engine.used == 10 and port.used == 10


def test_the_oldest_receiver_goes_first_in_a_share_and_its_parent() -> None:
    """Registered in both in the same order: the parent's oldest is its share's oldest
    too, so large messages on a share cannot wait for each other across levels."""
    engine = InboundBudget(limit=100, slack=50)
    port = engine.share(50, slack=50)
    first, second = object(), object()
    assert port.try_take(first, 40)
    assert port.try_take(second, 10)
    assert engine.try_take(object(), 50)  # the engine is full as well
    assert not port.try_take(second, 10)
    assert port.try_take(first, 40)  # past both limits, within both slacks


def test_an_account_draws_on_the_budget_only_past_its_allowance() -> None:
    budget = InboundBudget(limit=100)
    account = InboundAccount(budget=budget, allowance=30)
    assert account.add_nowait(20) and budget.used == 0
    assert account.add_nowait(20) and budget.used == 10
    account.remove(15)
    assert account.held == 25 and budget.used == 0
    assert account.add_nowait(100) and budget.used == 95
    account.close()
    assert account.held == 0 and budget.used == 0


def test_an_account_without_a_budget_only_counts() -> None:
    account = InboundAccount(allowance=0)
    assert account.add_nowait(10**9)
    account.remove(10**9)
    assert account.held == 0


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from(["add", "remove", "done", "close"]),
            st.integers(0, 300),
        ),
        max_size=60,
    )
)
def test_accounts_and_their_budget_stay_consistent(operations: list[tuple[int, str, int]]) -> None:
    """Whatever the order: each account's charge is what it holds past its allowance,
    the budget holds the sum of the charges, and never more than limit + slack."""
    budget = InboundBudget(limit=400, slack=200)
    share = budget.share(150, slack=100)
    accounts = [
        InboundAccount(budget=budget, allowance=50),
        InboundAccount(budget=share, allowance=50),
        InboundAccount(budget=share, allowance=20),
    ]
    for index, operation, size in operations:
        account = accounts[index]
        if operation == "add":
            account.add_nowait(size)
        elif operation == "remove":
            account.remove(min(size, account.held))
        elif operation == "done":
            account.message_done()
        else:
            account.close()
        for each in accounts:
            assert each.charged == max(0, each.held - each.allowance)
        assert budget.used == sum(each.charged for each in accounts)
        assert share.used == sum(each.charged for each in accounts[1:])
        assert budget.used <= budget.limit + budget.slack
        assert share.used <= share.limit + share.slack
    for account in accounts:
        account.close()
    assert budget.used == 0 and share.used == 0
