"""Properties of the schedule computation against a brute-force scan.

The reference walks wall-clock time in order, day by day, and within a
matching day every (hour, minute, second) in order, checking each field
against the expression's *text* with its own tiny matcher, so it shares no
code with croniter nor with the field parser.  Zones without DST (UTC and
fixed offsets) make wall time and instants agree; DST rules have their own
example tests in test_cron.py.
"""

from __future__ import annotations

import datetime as dt

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from iii.modules.cron.schedule import parse_schedule

UTC = dt.UTC
NAMES_DOW = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]


def _matches(
    text: str, value: int, lo: int, hi: int, names: list[str] | None = None, base: int = 0
) -> bool:
    """Independent matcher for one field: is ``value`` allowed by ``text``?"""
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if body in ("*", "?"):
            first, last = lo, hi
        elif "-" in body:
            a, b = body.split("-")
            first, last = _num(a, names, base), _num(b, names, base)
        else:
            first = _num(body, names, base)
            last = hi if step_text else first
        if first <= value <= last and (value - first) % step == 0:
            return True
    return False


def _num(text: str, names: list[str] | None, base: int) -> int:
    if names and text.upper() in names:
        return names.index(text.upper()) + base
    return int(text)


def brute_next(expression: str, after: dt.datetime, *, years: int = 6) -> dt.datetime | None:
    fields = expression.split()
    five = len(fields) == 5
    if five:
        fields = ["0", *fields]
    sec, minute, hour, dom, month, dow = fields[:6]
    year = fields[6] if len(fields) == 7 else "*"
    day = after.replace(hour=0, minute=0, second=0, microsecond=0)
    end = after + dt.timedelta(days=366 * years)
    while day <= end:
        weekday = (day.weekday() + 1) % 7  # 0 = Sunday
        if five:
            dow_ok = _matches(dow, weekday, 0, 7, NAMES_DOW, 0) or (
                weekday == 0 and _matches(dow, 7, 0, 7, NAMES_DOW, 0)
            )
        else:
            dow_ok = _matches(dow, weekday + 1, 1, 7, NAMES_DOW, 1)
        dom_ok = _matches(dom, day.day, 1, 31)
        restricted = (
            dom[0] not in "*?" and dow[0] not in "*?"
        )  # Vixie: a leading '*' is unrestricted
        day_ok = (dom_ok or dow_ok) if (five and restricted) else (dom_ok and dow_ok)
        if day_ok and _matches(month, day.month, 1, 12) and _matches(year, day.year, 1970, 2099):
            for h in range(24):
                if not _matches(hour, h, 0, 23):
                    continue
                for m in range(60):
                    if not _matches(minute, m, 0, 59):
                        continue
                    for s in range(60):
                        if _matches(sec, s, 0, 59):
                            candidate = day.replace(hour=h, minute=m, second=s)
                            if candidate > after:
                                return candidate
        day += dt.timedelta(days=1)
    return None


def field(
    lo: int, hi: int, names: list[str] | None = None, base: int = 0
) -> st.SearchStrategy[str]:
    value = st.integers(lo, hi)
    word = value.map(str)
    if names:
        word = st.one_of(
            word,
            st.integers(0, len(names) - 1)
            .filter(lambda i: lo <= i + base <= hi)
            .map(lambda i: names[i]),
        )
    single = word
    ranged = st.tuples(value, value).map(lambda ab: f"{min(ab)}-{max(ab)}")
    stepped = st.tuples(st.sampled_from(["*", str(lo)]), st.integers(1, max(1, hi - lo))).map(
        lambda t: f"{t[0]}/{t[1]}"
    )
    ranged_step = st.tuples(value, value, st.integers(1, 5)).map(
        lambda t: f"{min(t[:2])}-{max(t[:2])}/{t[2]}"
    )
    item = st.one_of(single, ranged, stepped, ranged_step)
    listed = st.lists(item, min_size=2, max_size=3).map(",".join)
    return st.one_of(st.just("*"), item, listed)


six_field = st.tuples(
    field(0, 59), field(0, 59), field(0, 23), field(1, 28), field(1, 12), field(1, 7, NAMES_DOW, 1)
).map(" ".join)
seven_field = st.tuples(six_field, st.sampled_from(["*", "2024-2030", "2025,2027"])).map(" ".join)
five_field = st.tuples(
    field(0, 59), field(0, 23), field(1, 28), field(1, 12), field(0, 7, NAMES_DOW, 0)
).map(" ".join)
instants = st.datetimes(min_value=dt.datetime(2024, 1, 1), max_value=dt.datetime(2026, 12, 31)).map(
    lambda d: d.replace(microsecond=0, tzinfo=UTC)
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.one_of(six_field, seven_field, five_field), instants)
def test_next_matches_brute_force_utc(expression: str, after: dt.datetime) -> None:
    schedule = parse_schedule(expression)
    expected = brute_next(expression, after)
    got = schedule.next_after(after)
    if expected is None:
        assert got is None or got > after + dt.timedelta(days=366 * 6)
    else:
        assert got == expected, (expression, after)


@SETTINGS
@given(
    st.one_of(six_field, five_field),
    instants,
    st.sampled_from(["Asia/Kolkata", "Asia/Tokyo", "Etc/GMT+5"]),
)
def test_next_matches_brute_force_fixed_offset_zone(
    expression: str, after: dt.datetime, zone: str
) -> None:
    schedule = parse_schedule(expression, zone)
    local_after = after.astimezone(schedule.timezone).replace(tzinfo=None)
    expected = brute_next(expression, local_after)
    got = schedule.next_after(after)
    if expected is not None:
        assert got is not None
        assert got.astimezone(schedule.timezone).replace(tzinfo=None) == expected, (
            expression,
            after,
            zone,
        )


@SETTINGS
@given(st.one_of(six_field, five_field), instants)
def test_successive_times_increase_and_match(expression: str, after: dt.datetime) -> None:
    schedule = parse_schedule(expression, "Europe/Berlin")
    current = after
    for _ in range(5):
        nxt = schedule.next_after(current)
        if nxt is None:
            break
        assert nxt > current
        current = nxt


def test_seventh_field_year() -> None:
    schedule = parse_schedule("0 0 0 1 1 * 2030")
    assert schedule.next_after(dt.datetime(2024, 5, 1, tzinfo=UTC)) == dt.datetime(
        2030, 1, 1, tzinfo=UTC
    )
    assert schedule.next_after(dt.datetime(2030, 1, 1, tzinfo=UTC)) is None
