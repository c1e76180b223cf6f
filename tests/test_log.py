"""iii.log: one record is one line, peer text is bounded, warnings are rate-limited.

The property tests format records whose message, arguments and exception text
are arbitrary Unicode (line breaks, ESC, C1 controls, U+2028, bidi overrides,
lone surrogates...) and check what a log reader relies on: however the text
is split into lines, the first line is the record and every other line is a
continuation that cannot pass for a record.
"""

from __future__ import annotations

import logging
import re
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iii.log import (
    CONTINUATION,
    MAX_MESSAGE_CHARS,
    MAX_TRACEBACK_LINES,
    SNIPPET_CHARS,
    LineFormatter,
    RateLimitedLog,
    bounded_repr,
    clean,
    describe_error,
    escape,
    record_message,
    truncate,
)

RECORD = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: "
)
# Everything str.splitlines() splits on, and the other characters a terminal
# or an editor may treat specially.
DANGEROUS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
FORGED = "2001-01-01 00:00:00,000 CRITICAL iii.engine: FORGED"

# Text that favours the characters that matter, and sometimes a forged record.
hostile_text = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from("a\n\r\x1b\x85\u2028\u2029\u202e\x0b\x0c\x1c\ud800 %")),
    st.builds(
        lambda a, sep, b: f"{a}{sep}{FORGED}{b}",
        st.text(max_size=5),
        st.sampled_from(["\n", "\r", "\r\n", "\u2028", "\x85", "\x1b[2K\r"]),
        st.text(max_size=5),
    ),
)


def make_record(
    message: str, args: tuple[Any, ...] = (), exc: BaseException | None = None
) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("iii.test", logging.WARNING, __file__, 1, message, args, exc_info)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - only to attach a traceback
        return caught


def check_one_record(output: str, formatter_prefix_len: int = 60) -> list[str]:
    lines = output.splitlines()
    assert lines, output
    assert RECORD.match(lines[0]), lines[0]
    for line in lines[1:]:
        assert line.startswith(CONTINUATION), (line, output)
        assert not RECORD.match(line)
    # Only the separators the formatter put there.
    assert not DANGEROUS.search(output.replace("\n" + CONTINUATION, "")), output
    # Each line is bounded, whatever the input.
    for line in lines:
        assert len(line) <= formatter_prefix_len + MAX_MESSAGE_CHARS + 40, len(line)
    return lines


@settings(max_examples=300, deadline=None)
@given(
    prefix=hostile_text,
    args=st.lists(st.one_of(hostile_text, st.integers(), st.binary(max_size=20)), max_size=3),
    exc_text=st.one_of(st.none(), hostile_text),
    note=st.one_of(st.none(), hostile_text),
)
def test_any_record_formats_to_one_record(
    prefix: str, args: list[Any], exc_text: str | None, note: str | None
) -> None:
    message = prefix.replace("%", "%%") + " %s" * len(args)
    exc: BaseException | None = None
    if exc_text is not None:
        cause = raised(KeyError(exc_text))
        try:
            raise ValueError(exc_text) from cause
        except ValueError as caught:
            if note is not None:
                caught.add_note(note)
            exc = caught
    lines = check_one_record(LineFormatter().format(make_record(message, tuple(args), exc)))
    if exc is not None:
        assert any(line.startswith(CONTINUATION + "ValueError") for line in lines)


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(hostile_text, min_size=1, max_size=4))
def test_exception_groups_keep_every_member_escaped(texts: list[str]) -> None:
    group = raised(ExceptionGroup("group\n" + FORGED, [raised(RuntimeError(t)) for t in texts]))
    lines = check_one_record(LineFormatter().format(make_record("failed", (), group)))
    assert sum("RuntimeError" in line for line in lines) == len(texts)


def test_forged_record_stays_inside_its_record() -> None:
    formatter = LineFormatter()
    output = formatter.format(make_record("worker %s disconnected", (f"x\n{FORGED}",)))
    assert "\n" not in output
    assert output.endswith("worker x\\n" + FORGED + " disconnected")
    exc = raised(ValueError(f"bad\r\n{FORGED}"))
    output = formatter.format(make_record("failed", (), exc))
    first, *rest = output.split("\n")
    assert rest and all(line.startswith(CONTINUATION) for line in rest)
    assert rest[-1] == CONTINUATION + "ValueError: bad\\r\\n" + FORGED


def test_long_messages_and_arguments_are_cut_with_a_count() -> None:
    output = LineFormatter().format(make_record("got %r and %s", ("a" * 10_000, "b" * 50)))
    assert len(output) < MAX_MESSAGE_CHARS + 100
    assert "more chars)" in output
    stored = record_message(make_record("%s", ("c" * (MAX_MESSAGE_CHARS + 5),)))
    assert stored == "c" * MAX_MESSAGE_CHARS + "… (5 more chars)"
    # Structured sinks keep line breaks: they are data there, not record ends.
    assert record_message(make_record("a\nb %s", ("c\nd",))) == "a\nb c\nd"


def test_a_huge_argument_is_never_copied_whole() -> None:
    huge = "z" * (50 * 1024 * 1024)
    record = make_record("worker %s (%r) said %s", ("w", huge, b"q" * (20 * 1024 * 1024)))
    formatter = LineFormatter()
    tracemalloc.start()
    try:
        output = formatter.format(record)
        stored = record_message(record)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(output) < 2 * MAX_MESSAGE_CHARS and len(stored) < 2 * MAX_MESSAGE_CHARS
    assert peak < 1024 * 1024, peak


def test_long_tracebacks_keep_their_ends() -> None:
    # Two functions in turn, so Python's "[Previous line repeated N more times]"
    # cannot fold the frames.
    def ping(n: int) -> None:
        if n == 0:
            raise ValueError("deep\n" + FORGED)
        pong(n - 1)

    def pong(n: int) -> None:
        ping(n - 1)

    exc = raised(RecursionError())
    try:
        ping(MAX_TRACEBACK_LINES)
    except ValueError as caught:
        exc = caught
    lines = check_one_record(LineFormatter().format(make_record("failed", (), exc)))
    assert len(lines) <= MAX_TRACEBACK_LINES + 2
    assert any("more lines)" in line for line in lines)
    assert lines[-1] == CONTINUATION + "ValueError: deep\\n" + FORGED


def test_stack_info_and_cached_exc_text_are_continuations() -> None:
    record = make_record("here")
    record.stack_info = f"Stack (most recent call last):\n  line\n{FORGED}"
    record.exc_text = f"Traceback...\n{FORGED}"
    check_one_record(LineFormatter().format(record))


def test_escape_and_clean() -> None:
    assert escape("a\nb\rc\td\x1be\x85f\u2028g\u202eh\ud800i\\j") == (
        "a\\nb\\rc\\td\\x1be\\x85f\\u2028g\\u202eh\\ud800i\\j"
    )
    assert escape("plain ünïcode ✓") == "plain ünïcode ✓"
    assert clean("x" * 10, 4) == "xxxx… (6 more chars)"
    # An escape that would pass the bound is left out, and counted.
    assert clean("abc\n", 4) == "abc… (1 more chars)"
    assert clean("\n" * 10, 5) == "\\n\\n… (8 more chars)"
    assert truncate("short") == "short"


@given(text=hostile_text, limit=st.integers(min_value=1, max_value=50))
def test_clean_is_bounded_and_safe(text: str, limit: int) -> None:
    out = clean(text, limit)
    assert not DANGEROUS.search(out)
    body, marker, rest = out.rpartition("… (")
    if marker and rest.endswith(" more chars)") and rest[: -len(" more chars)")].isdigit():
        assert len(body) <= limit
    else:
        assert out == escape(text) and len(out) <= limit


def test_bounded_repr() -> None:
    assert bounded_repr("abc") == "'abc'"
    assert bounded_repr("a" * (SNIPPET_CHARS + 7)) == repr("a" * SNIPPET_CHARS) + "… (7 more chars)"
    assert bounded_repr(b"b" * (SNIPPET_CHARS + 1)).endswith("… (1 more bytes)")
    many = bounded_repr(["x" * 1000] * 10_000)
    assert len(many) <= SNIPPET_CHARS + 30
    assert bounded_repr(None) == "None" and bounded_repr(12) == "12"
    assert describe_error(KeyError("k" * 1000)).startswith("KeyError: 'kkk")
    assert len(describe_error(KeyError("k" * 1000))) < SNIPPET_CHARS + 40


# -- RateLimitedLog ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_lets_a_burst_through_then_one_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="iii.test.rate")
    clock = FakeClock()
    limited = RateLimitedLog(
        logging.getLogger("iii.test.rate"), burst=3, interval=10.0, clock=clock
    )
    results = [limited.warning("bad frame %d", i) for i in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert [r.getMessage() for r in caplog.records] == ["bad frame 0", "bad frame 1", "bad frame 2"]
    clock.now += 9.9
    assert not limited.warning("bad frame %d", 10)
    clock.now += 0.1
    assert limited.warning("bad frame %d (100%% bad)", 11)
    assert caplog.records[-1].getMessage() == (
        "bad frame 11 (100% bad) (and 8 more like it since the last report)"
    )
    assert not limited.warning("no args %")
    clock.now += 10
    assert limited.warning("no args %")
    assert caplog.records[-1].getMessage() == "no args % (and 1 more like it since the last report)"
    assert limited.logged == 5 and limited.held == 0


def test_rate_limited_log_can_report_to_another_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    limited = RateLimitedLog(logging.getLogger("iii.test.a"), burst=1)
    limited.warning("one", logger=logging.getLogger("iii.test.b"), extra={"worker_id": "w"})
    (record,) = caplog.records
    assert record.name == "iii.test.b" and record.worker_id == "w"


def test_the_old_formatter_fails_the_property() -> None:
    """The property is not vacuous: the stdlib formatter the engine used breaks it."""
    old = logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s")
    with pytest.raises(AssertionError):
        check_one_record(old.format(make_record("worker %s", (f"x\n{FORGED}",))))


def test_rate_limited_log_reports_what_it_held_when_the_source_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="iii.test.held")
    limited = RateLimitedLog(logging.getLogger("iii.test.held"), burst=1, clock=FakeClock())
    limited.report_held("worker %s", "w1")
    assert not caplog.records
    for _ in range(4):
        limited.warning("bad frame")
    limited.report_held("worker %s", "w1")
    assert [r.getMessage() for r in caplog.records] == [
        "bad frame",
        "worker w1: 3 more warnings like the last one were not logged",
    ]
    limited.report_held("worker %s", "w1")
    assert len(caplog.records) == 2
