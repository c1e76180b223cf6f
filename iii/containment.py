"""Containment: a failure in one connection, call or event ends that one only.

The engine's supervision tree (:mod:`iii.engine`) is one-for-all for modules
only.  Work that runs on a peer's behalf (a connection's tasks, a call, the
delivery of one event to a trigger) runs through :func:`contained` or
:func:`start_contained`: an unexpected exception there (or an exception
group of them) is logged once, with what failed, and goes no further.
``trio.Cancelled`` always propagates: only the ``Exception`` part of a group
is taken, the rest is re-raised.

The log line is bounded and safe to read: the traceback's frames (our code),
then each exception's type and its message as a ``repr`` cut to
``MESSAGE_LIMIT`` characters (a message may carry a peer's data, and must
not forge log lines).  ``what`` is cut to ``WHAT_LIMIT`` characters; callers
format peer-supplied parts of it with ``%r``/``!r``.

Lifetime: nothing here owns a task; :func:`start_contained` starts one in
the caller's nursery.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

__all__ = ["contained", "start_contained", "report_failure", "describe_failure", "bounded"]

log = logging.getLogger(__name__)

WHAT_LIMIT = 200
MESSAGE_LIMIT = 500
FRAMES_LIMIT = 40  # innermost frames kept per exception
LEAVES_LIMIT = 5  # exceptions of a group described in full

Failure = Callable[[BaseException], None]


def bounded(text: str, limit: int = WHAT_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


async def contained(
    what: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    on_failure: Failure | None = None,
) -> bool:
    """Await ``fn(*args)``; an ``Exception`` from it is logged and swallowed.

    Returns False if it failed (after ``on_failure``, given the exception,
    has run).  Cancellation is never swallowed.
    """
    failed = False
    try:
        await fn(*args)
    except* Exception as group:
        # Handled in here: a Cancelled in the same group is re-raised when
        # this clause ends, and the failure must be reported all the same.
        failed = True
        failure = report_failure(what, group)
        if on_failure is not None:
            on_failure(failure)
    return not failed


def report_failure(what: str, group: BaseExceptionGroup[Exception]) -> BaseException:
    """Log what an ``except* Exception`` clause caught; returns the failure
    (the one exception, or the group).

    For hot paths, where :func:`contained`'s extra coroutine layer would be
    paid on every resumption of the task (iii.wsserver).
    """
    failure = group.exceptions[0] if len(group.exceptions) == 1 else group
    log.error("%s failed: %s", bounded(what), describe_failure(failure))
    return failure


def start_contained(
    nursery: trio.Nursery, what: str, fn: Callable[..., Awaitable[Any]], *args: Any
) -> None:
    """Start ``fn(*args)`` in ``nursery``, contained (see :func:`contained`)."""
    nursery.start_soon(contained, what, fn, *args)


def describe_failure(exc: BaseException) -> str:
    """A bounded description: for each exception, its frames, then ``Type: 'message'``."""
    lines: list[str] = []
    leaves = list(_leaves(exc))
    for leaf in leaves[:LEAVES_LIMIT]:
        frames = traceback.extract_tb(leaf.__traceback__)
        if len(frames) > FRAMES_LIMIT:
            lines.append(f"  ... {len(frames) - FRAMES_LIMIT} outer frames left out\n")
            frames = traceback.StackSummary.from_list(frames[-FRAMES_LIMIT:])
        lines.append("Traceback (most recent call last):\n")
        lines.extend(frames.format())
        lines.append(f"{type(leaf).__module__}.{type(leaf).__qualname__}: {_message(leaf)}\n")
    if len(leaves) > LEAVES_LIMIT:
        lines.append(f"... and {len(leaves) - LEAVES_LIMIT} more exceptions\n")
    return "\n" + "".join(lines).rstrip("\n")


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the failure
        text = "<unprintable>"
    return repr(bounded(text, MESSAGE_LIMIT))


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
