"""iii.containment: a failure is logged once, bounded and quoted; Cancelled always passes."""

from __future__ import annotations

import logging

import pytest
import trio

from iii.containment import contained, start_contained


async def test_an_exception_is_logged_once_and_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[BaseException] = []

    async def boom() -> None:
        raise ValueError("x" * 100_000 + "\n2026-01-01 CRITICAL iii.engine: FORGED")

    assert await contained("event 'e1'", boom, on_failure=seen.append) is False
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.ERROR and message.startswith("event 'e1' failed:")
    assert "ValueError" in message and "in boom" in message  # the frame is kept
    assert len(message) < 5_000 and "\n2026-01-01 CRITICAL" not in message
    assert isinstance(seen[0], ValueError)


async def test_success_returns_true() -> None:
    async def fine(x: int) -> None:
        assert x == 1

    assert await contained("fine", fine, 1) is True


async def test_cancelled_propagates_and_a_group_s_exception_part_is_still_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.CancelScope() as outer:

        async def both() -> None:
            async def sleeper() -> None:
                await trio.sleep_forever()

            async def failer() -> None:
                await trio.sleep(0)
                outer.cancel()
                raise RuntimeError("at the same time")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sleeper)
                nursery.start_soon(failer)

        await contained("both", both)
        raise AssertionError("not reached: the cancellation goes on")
    assert outer.cancelled_caught
    assert "at the same time" in caplog.text


async def test_start_contained_keeps_the_nursery_alive(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise KeyError("k")

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            start_contained(nursery, "job", boom)
    assert caplog.text.count("job failed") == 3


async def test_a_long_recursion_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    def down(n: int) -> int:
        return down(n + 1)

    async def deep() -> None:
        down(0)

    await contained("deep", deep)
    assert "outer frames left out" in caplog.text and "RecursionError" in caplog.text
    assert len(caplog.text) < 20_000
