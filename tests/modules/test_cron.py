"""The cron module on trio's autojump clock: schedules, numbering, time zones, DST,
misfire grace, conditions, and registration errors.

The module gets a virtual wall clock (``base`` + trio's virtual time) through
its ``clock`` constructor parameter; the target is an engine-side function that
records every payload it receives.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel

from iii.errors import IIIError
from iii.modules.cron import Config, Module
from iii.registry import TriggerRegistration
from iii.testing import make_config, open_test_engine

UTC = dt.UTC


class VirtualClock:
    """Wall time = ``base`` + trio's (virtual) time since construction."""

    def __init__(self, base: dt.datetime):
        self.base = base
        self.t0 = trio.current_time()

    def now(self) -> dt.datetime:
        return self.base + dt.timedelta(seconds=trio.current_time() - self.t0)

    async def sleep_until(self, when: dt.datetime) -> None:
        await trio.sleep_until(self.t0 + (when - self.base).total_seconds())


class Recorder:
    def __init__(self, engine: Any, function_id: str = "t::tick", *, delay: float = 0.0):
        self.calls: list[dict[str, Any]] = []
        self.delay = delay
        engine.register_function(function_id, self.handle)

    async def handle(self, data: Any, ctx: Any) -> Any:
        self.calls.append(data)
        if self.delay and len(self.calls) == 1:
            await trio.sleep(self.delay)
        return None

    @property
    def scheduled(self) -> list[str]:
        return [c["scheduled_time"] for c in self.calls]


@asynccontextmanager
async def cron_engine(
    base: dt.datetime, config: Config | None = None
) -> AsyncIterator[tuple[Any, Module]]:
    async with open_test_engine(make_config(modules=[])) as engine:
        module = Module(engine, config or Config(), clock=VirtualClock(base))
        async with trio.open_nursery() as nursery:
            await nursery.start(module.run)
            yield engine, module
            nursery.cancel_scope.cancel()


def register(
    engine: Any, config: dict[str, Any], trigger_id: str = "t1", function_id: str = "t::tick"
) -> Any:
    return engine.register_trigger(
        TriggerRegistration(
            worker_id=None,
            id=trigger_id,
            trigger_type="cron",
            function_id=function_id,
            config=config,
        )
    )


def iso(*args: int) -> str:
    return dt.datetime(*args, tzinfo=UTC).isoformat()


# Start a little after midnight so the grace window (1 s) catches nothing.
SUNDAY = dt.datetime(2024, 1, 7, 0, 0, 5, tzinfo=UTC)


async def test_seconds_field_and_payload(autojump_clock: Any) -> None:
    async with cron_engine(SUNDAY) as (engine, _):
        rec = Recorder(engine)
        assert register(engine, {"expression": "*/15 * * * * *"}) is None
        await trio.sleep(61)
    assert rec.scheduled == [iso(2024, 1, 7, 0, 0, s) for s in (15, 30, 45)] + [
        iso(2024, 1, 7, 0, 1, 0)
    ]
    first = rec.calls[0]
    assert first["trigger"] == "cron" and first["job_id"] == "t1"
    assert dt.datetime.fromisoformat(first["actual_time"]) >= dt.datetime.fromisoformat(
        first["scheduled_time"]
    )


async def test_day_of_week_one_is_sunday_in_six_fields(autojump_clock: Any) -> None:
    async with cron_engine(SUNDAY) as (engine, _):
        monday = Recorder(engine)
        sunday = Recorder(engine, "t::sun")
        assert register(engine, {"expression": "0 0 12 * * 2"}) is None  # 2 = Monday upstream
        assert register(engine, {"expression": "0 0 12 * * 1"}, "t2", "t::sun") is None
        await trio.sleep(8 * 86400)
    assert monday.scheduled == [iso(2024, 1, 8, 12)]
    assert sunday.scheduled == [iso(2024, 1, 7, 12), iso(2024, 1, 14, 12)]


async def test_day_names_and_sunday_numbering(autojump_clock: Any) -> None:
    async with cron_engine(SUNDAY) as (engine, _):
        sun6 = Recorder(engine, "t::sun6")
        sun5 = Recorder(engine, "t::sun5")
        sun7 = Recorder(engine, "t::sun7")
        weekdays = Recorder(engine, "t::weekdays")
        assert register(engine, {"expression": "0 0 9 * * SUN"}, "a", "t::sun6") is None
        assert register(engine, {"expression": "0 9 * * 0"}, "b", "t::sun5") is None
        assert register(engine, {"expression": "0 9 * * 7"}, "c", "t::sun7") is None
        assert register(engine, {"expression": "0 9 * * MON-FRI"}, "d", "t::weekdays") is None
        await trio.sleep(7 * 86400)
    assert sun6.scheduled == sun5.scheduled == sun7.scheduled == [iso(2024, 1, 7, 9)]
    assert weekdays.scheduled == [iso(2024, 1, d, 9) for d in range(8, 13)]


async def test_five_field_form_fires_at_second_zero(autojump_clock: Any) -> None:
    async with cron_engine(SUNDAY) as (engine, _):
        rec = Recorder(engine)
        assert register(engine, {"expression": "*/20 * * * *"}) is None
        await trio.sleep(3600)
    assert rec.scheduled == [iso(2024, 1, 7, 0, m) for m in (20, 40)] + [iso(2024, 1, 7, 1, 0)]


async def test_five_field_day_fields_are_or_six_field_are_and(autojump_clock: Any) -> None:
    # January 2024: the 13th is a Saturday; Fridays are 5, 12, 19, 26.
    start = dt.datetime(2024, 1, 1, 0, 0, 5, tzinfo=UTC)
    async with cron_engine(start) as (engine, _):
        vixie = Recorder(engine, "t::or")
        quartz = Recorder(engine, "t::and")
        assert register(engine, {"expression": "0 12 13 * 5"}, "a", "t::or") is None
        assert (
            register(engine, {"expression": "0 0 12 13 * 6"}, "b", "t::and") is None
        )  # 6 = Friday
        await trio.sleep(31 * 86400)
    assert vixie.scheduled == [iso(2024, 1, d, 12) for d in (5, 12, 13, 19, 26)]
    assert quartz.scheduled == []


async def test_timezone(autojump_clock: Any) -> None:
    async with cron_engine(SUNDAY) as (engine, _):
        rec = Recorder(engine)
        assert register(engine, {"expression": "0 0 9 * * *", "timezone": "Asia/Tokyo"}) is None
        await trio.sleep(2 * 86400)
    assert rec.scheduled == [iso(2024, 1, 8, 0), iso(2024, 1, 9, 0)]  # 09:00 JST = 00:00 UTC


async def test_dst_spring_forward_fires_once_after_the_gap(autojump_clock: Any) -> None:
    # New York, 2024-03-10: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
    start = dt.datetime(2024, 3, 9, 12, 0, 5, tzinfo=UTC)
    async with cron_engine(start) as (engine, _):
        rec = Recorder(engine)
        assert (
            register(engine, {"expression": "0 30 2 * * *", "timezone": "America/New_York"}) is None
        )
        await trio.sleep(3 * 86400)
    assert rec.scheduled == [
        iso(2024, 3, 10, 7, 0),
        iso(2024, 3, 11, 6, 30),
        iso(2024, 3, 12, 6, 30),
    ]


async def test_dst_fall_back_fixed_time_once_wildcard_hour_every_real_hour(
    autojump_clock: Any,
) -> None:
    # New York, 2024-11-03: 02:00 EDT goes back to 01:00 EST; 01:30 happens twice.
    start = dt.datetime(2024, 11, 3, 4, 0, 5, tzinfo=UTC)  # 00:00:05 EDT
    async with cron_engine(start) as (engine, _):
        daily = Recorder(engine, "t::daily")
        hourly = Recorder(engine, "t::hourly")
        tz = "America/New_York"
        assert (
            register(engine, {"expression": "0 30 1 * * *", "timezone": tz}, "a", "t::daily")
            is None
        )
        assert (
            register(engine, {"expression": "0 30 * * * *", "timezone": tz}, "b", "t::hourly")
            is None
        )
        await trio.sleep(4 * 3600)
    assert daily.scheduled == [iso(2024, 11, 3, 5, 30)]
    assert hourly.scheduled == [iso(2024, 11, 3, h, 30) for h in (4, 5, 6, 7)]


async def test_no_catch_up_burst_but_grace_fires_once(autojump_clock: Any) -> None:
    start = dt.datetime(2024, 1, 7, 0, 0, 0, 500000, tzinfo=UTC)
    async with cron_engine(start, Config(misfire_grace_ms=1000)) as (engine, _):
        rec = Recorder(engine, delay=3.5)  # the first run blocks the job for 3.5 s
        assert register(engine, {"expression": "* * * * * *"}) is None
        await trio.sleep(6.9)
    # 00:00:00 passed 0.5 s before registration: within grace, fires.  Its run
    # ends at 00:00:04.0: 01, 02, 03 are missed by more than the grace and
    # skipped; 04 is on time again.
    assert (
        rec.scheduled == [iso(2024, 1, 7, 0, 0, s) for s in (0, 4, 5, 6, 7)][: len(rec.scheduled)]
    )
    assert rec.scheduled[:3] == [iso(2024, 1, 7, 0, 0, s) for s in (0, 4, 5)]


async def test_registration_after_grace_waits_for_next_time(autojump_clock: Any) -> None:
    start = dt.datetime(2024, 1, 7, 0, 0, 2, tzinfo=UTC)
    async with cron_engine(start) as (engine, _):
        rec = Recorder(engine)
        assert register(engine, {"expression": "0 * * * * *"}) is None
        await trio.sleep(59)
    assert rec.scheduled == [iso(2024, 1, 7, 0, 1, 0)]


async def test_condition(autojump_clock: Any) -> None:
    async with cron_engine(SUNDAY) as (engine, _):
        rec = Recorder(engine)
        verdicts = iter([False, None, True])

        async def condition(data: Any, ctx: Any) -> Any:
            assert data["trigger"] == "cron"
            verdict = next(verdicts, "boom")
            if verdict == "boom":
                raise IIIError("no", code="condition_failed")
            return verdict

        engine.register_function("t::cond", condition)
        assert (
            register(engine, {"expression": "*/10 * * * * *", "_condition_path": "t::cond"}) is None
        )
        await trio.sleep(40)
    # 10: false (skip), 20: null (runs), 30: true (runs), 40: error (skip)
    assert rec.scheduled == [iso(2024, 1, 7, 0, 0, 20), iso(2024, 1, 7, 0, 0, 30)]


async def test_lock_prevents_double_fire_on_reregistration(autojump_clock: Any) -> None:
    start = dt.datetime(2024, 1, 7, 0, 0, 59, 800000, tzinfo=UTC)
    async with cron_engine(start) as (engine, _):
        rec = Recorder(engine)
        assert register(engine, {"expression": "0 * * * * *"}) is None
        await trio.sleep(0.5)  # fired 00:01:00
        engine.unregister_trigger(None, "t1")
        assert register(engine, {"expression": "0 * * * * *"}, "t1-again") is None
        await trio.sleep(0.2)  # 00:01:00 is within grace, but its lock is taken
    assert rec.scheduled == [iso(2024, 1, 7, 0, 1, 0)]


async def test_unregister_and_shutdown_stop_firing(autojump_clock: Any) -> None:
    async with cron_engine(SUNDAY) as (engine, module):
        rec = Recorder(engine)
        assert register(engine, {"expression": "* * * * * *"}) is None
        # Half a second off the ticks: trio picks the order of tasks waking at
        # the same virtual instant at random.
        await trio.sleep(3.5)
        engine.unregister_trigger(None, "t1")
        count = len(rec.calls)
        await trio.sleep(5)
        assert len(rec.calls) == count == 4  # :05 (registered on the second), :06, :07, :08
        assert register(engine, {"expression": "* * * * * *"}, "t2") is None
        await trio.sleep(2)
        engine.shutting_down.set()
        await trio.lowlevel.checkpoint()
        count = len(rec.calls)
        await trio.sleep(5)
        assert len(rec.calls) == count
        assert not module.jobs or all(job.scope.cancel_called for job in module.jobs.values())


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"expression": ""}, "Cron expression is required"),
        ({}, "Cron expression is required"),
        ({"expression": "* * *"}, "got 3"),
        ({"expression": "0 0 0 * * 0"}, "day-of-week field: 0 is out of range 1-7"),
        ({"expression": "0 61 * * * *"}, "minute field: 61"),
        ({"expression": "0 0 0 L * *"}, "'L' is not supported"),
        ({"expression": "0 0 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ("not an object", "must be an object"),
    ],
)
async def test_bad_config_is_refused_with_reason(config: Any, needle: str) -> None:
    async with cron_engine(SUNDAY) as (engine, module):
        Recorder(engine)
        error = register(engine, config)
        assert error is not None and error.code == "trigger_registration_failed"
        assert needle in error.message
        assert not module.jobs
