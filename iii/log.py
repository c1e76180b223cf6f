"""Logging helpers: one record per line, peer text bounded, repeated warnings rate-limited.

Every string a peer sends may end up in a log message: worker names, function
and trigger ids, HTTP paths, error texts, whole frames.  This module makes that
safe in one place, so that no log call can forget:

* :class:`LineFormatter`, the formatter of every text sink (``cli.py``'s
  stderr handler).  A record is exactly one line: control characters (CR, LF,
  ESC, the other C0 and C1 controls, DEL, Unicode line and paragraph
  separators, bidi overrides, lone surrogates) are escaped in the message, and
  the message is cut after :data:`MAX_MESSAGE_CHARS`.  A traceback keeps its
  lines, each prefixed with :data:`CONTINUATION` so that none can pass for a
  record, with the exception's own text escaped.
* :func:`record_message`, the bounded (not escaped) message of a record, for
  structured sinks such as the observability module's log store, where a
  newline is data, not a record boundary.
* Both format a record's arguments only after cutting each long string or
  bytes argument, so a 60 MiB worker name never becomes a 60 MiB string.
* :func:`truncate` and :func:`bounded_repr`, to bound peer data at the source,
  where error texts are built (``"not a UUID: 'ab…' (N more chars)"``).
* :class:`RateLimitedLog`: the first few warnings of one source (one
  connection, one listener), then at most one per interval, with the count of
  those held back.

This is ``iii.log``, not ``iii.logging``: it must not shadow the stdlib.
Library code still never configures handlers; ``cli.py`` and the observability
module do.

Lifetime: none: constants, pure functions, and small objects owned by
whoever creates them (a limiter lives as long as its connection).
"""

from __future__ import annotations

import logging
import math
import re
import reprlib
import time
import traceback
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import attrs

__all__ = [
    "MAX_MESSAGE_CHARS",
    "SNIPPET_CHARS",
    "MAX_TRACEBACK_LINES",
    "CONTINUATION",
    "LOG_FORMAT",
    "LineFormatter",
    "RateLimitedLog",
    "escape",
    "clean",
    "truncate",
    "bounded_repr",
    "describe_error",
    "record_message",
]

# A record's message is cut after this many characters (the record's fixed
# parts, and a traceback's lines, come on top).
MAX_MESSAGE_CHARS = 4096
# A peer value quoted inside an error text: enough to recognise it.
SNIPPET_CHARS = 200
# A traceback longer than this keeps its first and last lines.
MAX_TRACEBACK_LINES = 200
# Starts every line of a record after the first: no record starts with it.
CONTINUATION = "  | "
# The text sinks' format (cli.py).
LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"

# What could end a line for some reader (str.splitlines, a terminal, an
# editor) or make text read differently from how it is stored: C0 controls,
# DEL, C1 controls (NEL among them), the Unicode line/paragraph separators,
# the bidi marks, embeddings, overrides and isolates, and lone surrogates
# (which cannot even be encoded to UTF-8).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _more(count: int) -> str:
    return f"… ({count} more chars)"


def escape(text: str) -> str:
    """``text`` with every character in :data:`_UNSAFE` written as a backslash escape.

    Backslashes themselves are kept: the point is one line per record, and
    ``C:\\new`` should still read as a path.
    """
    if _UNSAFE.search(text) is None:  # the common case: no copy
        return text
    return _UNSAFE.sub(lambda match: _escaped(match.group()), text)


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS, *, already_cut: int = 0) -> str:
    """``text`` cut after ``limit`` characters, saying how many were left out.

    ``already_cut``: characters the caller left out before (they are counted).
    """
    if len(text) <= limit and not already_cut:
        return text
    return text[:limit] + _more(max(0, len(text) - limit) + already_cut)


def clean(text: str, limit: int = MAX_MESSAGE_CHARS, *, already_cut: int = 0) -> str:
    """``text`` escaped and cut so that the escaped part is at most ``limit`` characters.

    Only the first ``limit`` characters of ``text`` are ever looked at.
    """
    head = text[:limit]
    if _UNSAFE.search(head) is None:
        return truncate(text, limit, already_cut=already_cut)
    pieces: list[str] = []
    room, consumed, position = limit, 0, 0
    for match in _UNSAFE.finditer(head):
        plain = head[position : match.start()]
        if len(plain) >= room:
            pieces.append(plain[:room])
            consumed += room
            break
        pieces.append(plain)
        consumed += len(plain)
        room -= len(plain)
        escaped = _escaped(match.group())
        if len(escaped) > room:
            break
        pieces.append(escaped)
        consumed += 1
        room -= len(escaped)
        position = match.end()
    else:
        tail = head[position : position + room]
        pieces.append(tail)
        consumed += len(tail)
    left = len(text) - consumed + already_cut
    return "".join(pieces) + (_more(left) if left else "")


def _make_repr(limit: int) -> reprlib.Repr:
    # reprlib bounds containers (items per level, depth) without walking all
    # of them; strings get our own cut, which says how much is left out.
    bounded = reprlib.Repr()
    bounded.maxlevel = 3
    bounded.maxdict = bounded.maxlist = bounded.maxtuple = bounded.maxset = 8
    bounded.maxfrozenset = bounded.maxdeque = bounded.maxarray = 8
    bounded.maxstring = bounded.maxother = bounded.maxlong = limit
    return bounded


_REPR = _make_repr(SNIPPET_CHARS)


def bounded_repr(value: Any, limit: int = SNIPPET_CHARS) -> str:
    """``repr(value)``, built from at most about ``limit`` characters of it.

    For error texts that quote what a peer sent: the huge part of a huge value
    is never copied.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return repr(value[:limit]) + _more(len(value) - limit)
    if isinstance(value, (bytes, bytearray)):
        if len(value) <= limit:
            return repr(value)
        return repr(bytes(value[:limit])) + f"… ({len(value) - limit} more bytes)"
    text = _REPR.repr(value) if limit == SNIPPET_CHARS else _make_repr(limit).repr(value)
    return truncate(text, limit)


def describe_error(exc: BaseException, limit: int = SNIPPET_CHARS) -> str:
    """``"TypeName: message"`` with the message cut, for one-line warnings."""
    return f"{type(exc).__name__}: {truncate(str(exc), limit)}"


# -- records --------------------------------------------------------------------------------


def _merged(record: logging.LogRecord, limit: int) -> tuple[str, int]:
    """``record.getMessage()``, with long arguments cut before they are merged.

    Returns the message and how many characters of string arguments were cut.
    A message with a cut argument is itself longer than ``limit``, so the
    caller's cut (which counts them) always follows.
    """
    message = str(record.msg)
    args = record.args
    if not args:
        return message, 0
    cut = 0

    def bounded(value: object) -> object:
        nonlocal cut
        if isinstance(value, str) and len(value) > limit:
            cut += len(value) - limit
            return value[:limit]
        if isinstance(value, (bytes, bytearray)) and len(value) > limit:
            return bounded_repr(value, limit)
        return value

    if isinstance(args, Mapping):
        return message % {key: bounded(value) for key, value in args.items()}, cut
    return message % tuple(bounded(value) for value in args), cut


def record_message(record: logging.LogRecord, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The record's message, at most ``limit`` characters (plus the note of what was cut)."""
    message, cut = _merged(record, limit)
    return truncate(message, limit, already_cut=cut)


def _escape_exception_texts(exc: traceback.TracebackException) -> None:
    """Escape the exception messages and notes of a traceback, causes and groups included.

    ``TracebackException`` keeps each message in ``_str`` (3.11 to 3.13); if a
    later Python renames it, the lines are still escaped one by one and
    prefixed, so a forged record still cannot start a line.
    """
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        text = getattr(current, "_str", None)
        if isinstance(text, str):
            # A private attribute of TracebackException, not in its type stubs.
            setattr(current, "_str", clean(text))  # noqa: B010
        notes = current.__notes__
        if isinstance(notes, (list, tuple)):
            current.__notes__ = [clean(str(note)) for note in notes]
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
        pending.extend(getattr(current, "exceptions", None) or ())


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exception_lines(exc_info: ExcInfo | tuple[None, None, None]) -> list[str]:
    """A traceback as escaped lines, each bounded, at most :data:`MAX_TRACEBACK_LINES`."""
    _, value, tb = exc_info
    if value is None:
        return []
    formatted = traceback.TracebackException(type(value), value, tb, compact=True)
    _escape_exception_texts(formatted)
    return _bounded_lines("".join(formatted.format()))


def _bounded_lines(text: str) -> list[str]:
    lines = [clean(line) for line in text.splitlines()]
    if len(lines) > MAX_TRACEBACK_LINES:
        half = MAX_TRACEBACK_LINES // 2
        left_out = len(lines) - 2 * half
        lines = lines[:half] + [f"… ({left_out} more lines)"] + lines[-half:]
    return lines


class LineFormatter(logging.Formatter):
    """One record, one line; a traceback follows on lines that start with :data:`CONTINUATION`.

    The record's message is bounded and escaped (:func:`clean`), and the
    whole first line is escaped too, whatever fields the format names.
    ``record.exc_text`` is neither read from nor written to the record's cache
    when ``exc_info`` is there: other handlers format the same record their
    own way.
    """

    def __init__(self, fmt: str = LOG_FORMAT, datefmt: str | None = None):
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        message, cut = _merged(record, MAX_MESSAGE_CHARS)
        record.message = clean(message, already_cut=cut)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        lines = [escape(self.formatMessage(record))]
        if record.exc_info:
            lines.extend(_exception_lines(record.exc_info))
        elif record.exc_text:
            lines.extend(_bounded_lines(record.exc_text))
        if record.stack_info:
            lines.extend(_bounded_lines(record.stack_info))
        return ("\n" + CONTINUATION).join(lines)


# -- rate limiting --------------------------------------------------------------------------


@attrs.define(eq=False)
class RateLimitedLog:
    """Warnings from one source, bounded in rate: the first ``burst``, then one per ``interval``.

    A report after some were held back says how many.  Keep one per peer (a
    connection, a socket), so that a noisy peer silences only its own reports;
    a listener-wide one bounds reports about peers that have no connection yet.
    """

    logger: logging.Logger
    burst: int = 5
    interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    logged: int = 0
    held: int = 0
    _last: float = -math.inf

    def warning(
        self,
        message: str,
        *args: object,
        logger: logging.Logger | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> bool:
        return self.log(logging.WARNING, message, *args, logger=logger, extra=extra)

    def log(
        self,
        level: int,
        message: str,
        *args: object,
        logger: logging.Logger | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> bool:
        """Log now, or count the message as held back; True when it was logged."""
        target = logger or self.logger
        now = self.clock()
        if self.logged >= self.burst and now - self._last < self.interval:
            self.held += 1
            return False
        if self.held:
            # Literal text (no "%"), whether or not the message has arguments.
            message += f" (and {self.held} more like it since the last report)"
        self.logged += 1
        self.held = 0
        self._last = now
        target.log(level, message, *args, extra=extra)
        return True

    def report_held(self, source: str, *args: object, logger: logging.Logger | None = None) -> None:
        """When the source ends (a connection closes): one line for the reports never logged."""
        if not self.held:
            return
        held, self.held = self.held, 0
        (logger or self.logger).warning(
            source + f": {held} more warnings like the last one were not logged", *args
        )
