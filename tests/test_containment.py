"""iii.containment: a failure is logged once, bounded and quoted; Cancelled always passes."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.lowlevel

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
                await trio.lowlevel.checkpoint()
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


# -- in the engine: detached calls and per-event tasks ---------------------------------------


async def test_a_detached_task_that_fails_ends_only_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from iii.testing import connect_test_worker, make_config, open_test_engine

    async with open_test_engine(make_config()) as engine:

        async def boom() -> None:
            raise RuntimeError("detached bug")

        engine.spawn_detached(boom)
        with trio.fail_after(10):  # it has failed (and been logged) ...
            while "detached bug" not in caplog.text:
                await trio.sleep(0.01)
        async with connect_test_worker(engine) as worker:  # ... and the engine still serves
            assert "result" in await worker.call("engine::functions::list", {})
    assert "detached bug" in caplog.text


TRIGGER_CASES = {
    "state": (
        "modules::state::StateModule",
        {"scope": "s"},
        "state::set",
        {"scope": "s", "key": "k", "value": 1},
    ),
    "stream": (
        "modules::stream::StreamModule",
        {"stream_name": "s"},
        "stream::set",
        {"stream_name": "s", "group_id": "g", "item_id": "i", "data": 1},
    ),
    "subscribe": (
        "modules::pubsub::PubSubModule",
        {"topic": "t"},
        "publish",
        {"topic": "t", "data": 1},
    ),
    "queue": ("modules::queue::QueueModule", {"topic": "q"}, "enqueue", {"topic": "q", "data": 1}),
    "log": (
        "modules::observability::OtelModule",
        {"level": "all"},
        "engine::log::info",
        {"message": "m"},
    ),
    "cron": ("modules::cron::CronModule", {"expression": "* * * * * *"}, None, None),
}


@pytest.mark.parametrize("trigger_type", sorted(TRIGGER_CASES))
async def test_a_trigger_function_failing_unexpectedly_ends_that_event_only(
    trigger_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A function that raises a non-IIIError (a bug) on every event: each event is
    lost, logged; the module keeps firing the next ones and the engine serves."""
    from iii.registry import TriggerRegistration
    from iii.testing import connect_test_worker, make_config, open_test_engine

    module, config, function_id, data = TRIGGER_CASES[trigger_type]
    extra = {"port": 0, "host": "127.0.0.1"} if trigger_type == "stream" else {}
    fired: list[Any] = []

    async def boom(payload: Any, ctx: Any) -> Any:
        fired.append(payload)
        raise ValueError("trigger bug")

    async with open_test_engine(make_config([{"class": module, "config": extra}])) as engine:
        engine.register_function("test::boom", boom)
        error = engine.register_trigger(
            TriggerRegistration(
                worker_id=None,
                id="t1",
                trigger_type=trigger_type,
                function_id="test::boom",
                config=config,
            )
        )
        assert error is None, error
        with trio.fail_after(10):
            while len(fired) < 2:
                if function_id is not None:
                    await engine.invoke(function_id, dict(data))
                await trio.sleep(0.2)
        async with connect_test_worker(engine) as worker:
            assert "result" in await worker.call("engine::functions::list", {})
    assert "trigger bug" in caplog.text


async def test_a_queue_job_failing_unexpectedly_is_retried_with_backoff(
    autojump_clock: Any,
) -> None:
    """Not released to fail again at once: that looped thousands of times a second."""
    from iii.registry import TriggerRegistration
    from iii.testing import make_config, open_test_engine

    calls: list[Any] = []
    too_many = trio.Event()

    async def boom(payload: Any, ctx: Any) -> Any:
        calls.append(payload)
        if len(calls) > 3:
            too_many.set()
        raise ValueError("job bug")

    async with open_test_engine(make_config([{"class": "modules::queue::QueueModule"}])) as engine:
        engine.register_function("test::boom", boom)
        registration = TriggerRegistration(
            worker_id=None,
            id="t",
            trigger_type="queue",
            function_id="test::boom",
            config={"topic": "q"},
        )
        assert engine.register_trigger(registration) is None
        await engine.invoke("enqueue", {"topic": "q", "data": 1})
        with trio.fail_after(10):
            while not calls:
                await trio.sleep(0.01)
        # Virtual time (autojump_clock): one second, however busy the machine;
        # retries come after a backoff of a second or more.  A job failing again
        # at once would never let the clock move: the event ends that case.
        with trio.move_on_after(1.0):
            await too_many.wait()
    assert len(calls) <= 3
