"""Cron expressions: parsing, validation and "next fire time" computation.

Owns no state and does no I/O; a :class:`CronSchedule` is an immutable value.

Accepted forms (spec modules.md §3):

* **6 or 7 fields, seconds first** (upstream, the Rust ``cron`` crate):
  ``sec min hour day-of-month month day-of-week [year]`` with day-of-week
  **1–7 = Sunday–Saturday** (or ``SUN``–``SAT``).  When both day fields are
  restricted, a day must match both (the crate's rule).
* **5 fields, standard crontab**: ``min hour day-of-month month day-of-week``
  with day-of-week **0–7, 0 and 7 = Sunday**; it fires at second 0.  When
  both day fields are restricted, a day matching either fires (Vixie cron).
* Shorthands ``@yearly @annually @monthly @weekly @daily @midnight @hourly``.

Each field is parsed here (``*``, ``?``, ``a``, ``a-b``, ``*/s``, ``a/s``,
``a-b/s``, lists, month and weekday names) into an explicit set of values, so
an error names the field and the problem, and the day-of-week numbering is
settled before anything else sees it.  The sets are then handed to
``croniter`` (as explicit lists in its own numbering) which computes the next
time; ``L``, ``W`` and ``#`` are refused because neither upstream nor the
5-field form has them.

Time zones: the schedule matches wall-clock time in ``timezone`` (UTC by
default).  Around daylight-saving changes:

* a wall time that does not exist (clocks jump forward) fires once, at the
  first instant after the gap (croniter's rule, like Vixie cron);
* a wall time that happens twice (clocks go back) fires once, at its first
  occurrence, unless the hour field is ``*``: then every real hour fires, so
  "every 15 minutes" keeps its cadence through the repeated hour.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Sequence

import attrs
from croniter import CroniterBadDateError, croniter

__all__ = ["CronSchedule", "CronExpressionError", "parse_schedule", "FIELD_NAMES"]

UTC = dt.UTC

MONTH_NAMES = {
    n: i + 1
    for i, n in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    )
}
# Upstream numbering (1 = Sunday); the 5-field form shifts it to 0 = Sunday.
DAY_NAMES = {n: i + 1 for i, n in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}

FIELD_NAMES = ("second", "minute", "hour", "day-of-month", "month", "day-of-week", "year")

SHORTHANDS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 1",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}

# How far ahead a schedule may have no match (croniter's own search bound).
MAX_YEARS_BETWEEN_MATCHES = 200


class CronExpressionError(ValueError):
    """An expression (or time zone) that cannot be scheduled; the message says why."""


@attrs.frozen
class _FieldSpec:
    name: str
    lo: int
    hi: int
    names: dict[str, int] | None = None
    question_ok: bool = False


def _spec(name: str, *, five_field: bool) -> _FieldSpec:
    if name == "second":
        return _FieldSpec(name, 0, 59)
    if name == "minute":
        return _FieldSpec(name, 0, 59)
    if name == "hour":
        return _FieldSpec(name, 0, 23)
    if name == "day-of-month":
        return _FieldSpec(name, 1, 31, question_ok=True)
    if name == "month":
        return _FieldSpec(name, 1, 12, MONTH_NAMES)
    if name == "day-of-week":
        if five_field:
            return _FieldSpec(
                name, 0, 7, {n: v - 1 for n, v in DAY_NAMES.items()}, question_ok=True
            )
        return _FieldSpec(name, 1, 7, DAY_NAMES, question_ok=True)
    return _FieldSpec(name, 1970, 2099)


def _value(text: str, spec: _FieldSpec) -> int:
    upper = text.upper()
    if spec.names is not None and upper in spec.names:
        return spec.names[upper]
    if not text.isdigit():
        for bad in ("L", "W", "#"):
            if bad in upper:
                raise CronExpressionError(f"{spec.name} field: {bad!r} is not supported")
        raise CronExpressionError(f"{spec.name} field: {text!r} is not a number")
    value = int(text)
    if not spec.lo <= value <= spec.hi:
        hint = ""
        if spec.name == "day-of-week":
            hint = " (0 or 7 = Sunday)" if spec.lo == 0 else " (1 = Sunday, 7 = Saturday)"
        raise CronExpressionError(
            f"{spec.name} field: {value} is out of range {spec.lo}-{spec.hi}{hint}"
        )
    return value


def parse_field(text: str, spec: _FieldSpec) -> frozenset[int]:
    """The set of values a field allows; raises :class:`CronExpressionError`."""
    if not text:
        raise CronExpressionError(f"{spec.name} field is empty")
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronExpressionError(f"{spec.name} field: empty list item in {text!r}")
        body, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronExpressionError(f"{spec.name} field: bad step {step_text!r} in {part!r}")
            step = int(step_text)
        if body in ("*", "?"):
            if body == "?" and not spec.question_ok:
                raise CronExpressionError(
                    f"{spec.name} field: '?' is only allowed for the day fields"
                )
            lo, hi = spec.lo, spec.hi
        elif "-" in body:
            first, _, last = body.partition("-")
            lo, hi = _value(first, spec), _value(last, spec)
            if lo > hi:
                raise CronExpressionError(f"{spec.name} field: range {body!r} runs backwards")
        else:
            lo = _value(body, spec)
            hi = spec.hi if slash else lo
        values.update(range(lo, hi + 1, step))
    return frozenset(values)


@attrs.frozen
class CronSchedule:
    """A parsed expression in a time zone: the allowed values of every field."""

    expression: str
    timezone: dt.tzinfo
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday … 6 = Saturday, whatever the input numbering
    years: frozenset[int] | None
    # 5-field form with both day fields restricted: a day matching either fires.
    # Otherwise a day must match both (6/7-field form, the Rust crate's rule).
    day_or: bool
    hour_wildcard: bool
    _croniter_expr: str = attrs.field(alias="croniter_expr")

    # -- matching (used by the brute-force reference in the tests, and for DST) --

    def matches_wall(self, wall: dt.datetime) -> bool:
        """Does this wall-clock time (naive, in the schedule's zone) match?"""
        if wall.second not in self.seconds or wall.minute not in self.minutes:
            return False
        if wall.hour not in self.hours or wall.month not in self.months:
            return False
        if self.years is not None and wall.year not in self.years:
            return False
        weekday = (wall.weekday() + 1) % 7  # Python: Monday = 0
        day_ok, weekday_ok = wall.day in self.days, weekday in self.weekdays
        if self.day_or:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    # -- next fire time ------------------------------------------------------------

    def next_after(self, after: dt.datetime) -> dt.datetime | None:
        """The first fire time strictly after ``after`` (aware), as an aware UTC datetime.

        None when the schedule never fires again (a year field in the past).
        """
        local = after.astimezone(self.timezone)
        it = croniter(
            self._croniter_expr,
            local,
            day_or=self.day_or,
            second_at_beginning=True,
            max_years_between_matches=MAX_YEARS_BETWEEN_MATCHES,
        )
        for _ in range(1000):
            try:
                candidate: dt.datetime = it.get_next(dt.datetime)
            except CroniterBadDateError:  # no match within the search bound
                return None
            instant = candidate.astimezone(UTC)
            if instant <= after.astimezone(UTC):
                continue
            if self._repeated_wall_time(instant) and not self.hour_wildcard:
                continue
            return instant
        return None

    def latest_at_or_before(self, at: dt.datetime, window: float) -> dt.datetime | None:
        """The last fire time in ``(at - window, at]``, or None (for the grace rule)."""
        start = at.astimezone(UTC) - dt.timedelta(seconds=window)
        found = None
        cursor = start
        while True:
            candidate = self.next_after(cursor)
            if candidate is None or candidate > at.astimezone(UTC):
                return found
            found = cursor = candidate

    def _repeated_wall_time(self, instant: dt.datetime) -> bool:
        """Is ``instant`` the second occurrence of its wall-clock time (clocks went back)?"""
        local = instant.astimezone(self.timezone)
        wall = local.replace(tzinfo=None)
        first = wall.replace(tzinfo=self.timezone, fold=0)
        return first.utcoffset() != local.utcoffset() and first.astimezone(UTC) < instant


def _explicit(values: frozenset[int], lo: int, hi: int) -> str:
    if values == frozenset(range(lo, hi + 1)):
        return "*"
    return ",".join(str(v) for v in sorted(values))


def _zone(name: str | None) -> dt.tzinfo:
    if name is None or name in ("UTC", "utc", "Z"):
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise CronExpressionError(f"unknown time zone {name!r}") from exc


def parse_schedule(expression: str, timezone: str | None = None) -> CronSchedule:
    """Parse ``expression`` (see the module docstring); raises :class:`CronExpressionError`."""
    if not isinstance(expression, str) or not expression.strip():
        raise CronExpressionError("Cron expression is required")
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in SHORTHANDS:
            known = ", ".join(SHORTHANDS)
            raise CronExpressionError(f"unknown shorthand {text!r} (known: {known})")
        text = SHORTHANDS[text.lower()]
    fields: Sequence[str] = text.split()
    five_field = len(fields) == 5
    if five_field:
        fields = ["0", *fields]
    elif len(fields) not in (6, 7):
        raise CronExpressionError(
            f"expected 5 fields (min hour day month weekday) or 6-7 fields "
            f"(sec min hour day month weekday [year]), got {len(fields)}"
        )
    parsed = [
        parse_field(text_, _spec(name, five_field=five_field))
        for name, text_ in zip(FIELD_NAMES, fields, strict=False)
    ]
    seconds, minutes, hours, days, months, raw_weekdays = parsed[:6]
    years = parsed[6] if len(parsed) == 7 else None
    if five_field:
        weekdays = frozenset(v % 7 for v in raw_weekdays)
    else:
        weekdays = frozenset(v - 1 for v in raw_weekdays)
    # Vixie cron's rule: a day field starting with '*' (or '?') is unrestricted.
    days_restricted = not fields[3].startswith(("*", "?"))
    weekdays_restricted = not fields[5].startswith(("*", "?"))
    day_or = five_field and days_restricted and weekdays_restricted
    if not weekdays:
        raise CronExpressionError("day-of-week field allows no day")
    # A day-of-month set that no month can reach (e.g. only the 31st in February)
    # is caught by croniter's search bound; an impossible combination is refused here.
    if not any(d <= {2: 29, 4: 30, 6: 30, 9: 30, 11: 30}.get(m, 31) for d in days for m in months):
        raise CronExpressionError("day-of-month and month never meet (e.g. 30 February)")
    days_text, weekdays_text = _explicit(days, 1, 31), _explicit(weekdays, 0, 6)
    if day_or and "*" in (days_text, weekdays_text):
        days_text = weekdays_text = "*"  # either day field allows every day
    croniter_fields = [
        _explicit(seconds, 0, 59),
        _explicit(minutes, 0, 59),
        _explicit(hours, 0, 23),
        days_text,
        _explicit(months, 1, 12),
        weekdays_text,
    ]
    if years is not None:
        croniter_fields.append(_explicit(years, 1970, 2099))
    zone = _zone(timezone)
    return CronSchedule(
        expression=expression,
        timezone=zone,
        seconds=seconds,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=weekdays,
        years=years,
        day_or=day_or,
        hour_wildcard=hours == frozenset(range(24)),
        croniter_expr=" ".join(croniter_fields),
    )
