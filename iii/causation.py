"""Bounding triggers that re-fire themselves: a causation depth for every event.

A trigger whose own effect fires it again (a ``state`` trigger whose
condition is ``state::delete``, a handler that writes the state it watches)
would loop for ever.  So every event carries a *depth*:

* work the engine does outside any trigger runs at depth 0;
* an event produced by a task (a ``state::set``, a ``stream::set``, a
  ``publish``) carries that task's depth (:func:`current_depth`, a context
  variable: the condition, the handler call and every engine function they
  run in the same task see it);
* the triggers of an event of depth ``d`` run at depth ``d + 1``
  (:func:`firing`); past :data:`MAX_TRIGGER_DEPTH` they are not run, and a
  warning is logged (at most one every 10 s per trigger type, with a count).

A chain through a worker (a trigger calls a worker's function, which writes
the state it watches over its own connection) loses the context variable.
It is followed through the trace context instead: each firing sends a
``traceparent`` whose trace id :class:`TraceDepths` remembers with the
depth, and a call a worker makes with that trace id (an SDK propagates the
trace context of the invocation it is handling) runs at that depth.  With
the engine's tracer on, the trace id of the invocation span is remembered
instead (no made-up parent).  The table is bounded (least recently used
entries are forgotten), so a chain is bounded as long as its trace id stays
in the table.

Lifetime: :class:`TraceDepths` lives with the engine; the rest is per task.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "MAX_TRIGGER_DEPTH",
    "current_depth",
    "firing",
    "TraceDepths",
    "LoopWarning",
    "trace_for_firing",
]

log = logging.getLogger(__name__)

MAX_TRIGGER_DEPTH = 16
TRACE_TABLE_SIZE = 10_000
WARN_INTERVAL = 10.0

_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("iii_trigger_depth", default=0)


def current_depth() -> int:
    """The causation depth of the running task (0 outside any trigger)."""
    return _DEPTH.get()


@contextmanager
def firing(depth: int) -> Iterator[None]:
    """Run the block at ``depth`` (the triggers of an event of depth ``depth - 1``)."""
    token = _DEPTH.set(depth)
    try:
        yield
    finally:
        _DEPTH.reset(token)


def _trace_id(traceparent: str | None) -> str | None:
    if not traceparent:
        return None
    parts = traceparent.split("-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    return parts[1].lower()


class TraceDepths:
    """trace id -> causation depth, for chains that pass through a worker."""

    def __init__(self, size: int = TRACE_TABLE_SIZE):
        self.size = size
        self._depths: OrderedDict[str, int] = OrderedDict()

    def remember(self, traceparent: str | None, depth: int) -> None:
        trace_id = _trace_id(traceparent)
        if trace_id is None:
            return
        self._depths[trace_id] = max(depth, self._depths.get(trace_id, 0))
        self._depths.move_to_end(trace_id)
        while len(self._depths) > self.size:
            self._depths.popitem(last=False)

    def new_traceparent(self, depth: int) -> str:
        """A fresh trace context for a firing at ``depth``, remembered."""
        traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        self.remember(traceparent, depth)
        return traceparent

    def depth_of(self, traceparent: str | None) -> int:
        """The depth of a call made with ``traceparent`` (0 if its trace is unknown)."""
        return self.depth_of_trace(_trace_id(traceparent))

    def depth_of_trace(self, trace_id: str | None) -> int:
        """The depth of work done in trace ``trace_id`` (lowercase hex; 0 if unknown)."""
        if trace_id is None:
            return 0
        depth = self._depths.get(trace_id)
        if depth is None:
            return 0
        self._depths.move_to_end(trace_id)
        return depth


def trace_for_firing(depths: TraceDepths, tracing: bool, depth: int) -> dict[str, Any]:
    """``Engine.invoke`` keywords that let a worker's calls be traced back to a firing.

    ``tracing``: the engine's tracer records spans (``EngineTracer.records_spans``);
    the invocation span's own trace id is then remembered.
    """
    if tracing:
        return {"on_span": lambda span: depths.remember(span.traceparent, depth)}
    return {"traceparent": depths.new_traceparent(depth)}


class LoopWarning:
    """The rate-limited warning for triggers not run because the chain is too deep."""

    def __init__(self, what: str):
        self.what = what
        self.last = -WARN_INTERVAL
        self.held = 0
        self.skipped = 0  # every firing skipped, for tests and statistics

    def too_deep(self, depth: int, function_ids: list[str]) -> bool:
        """True (and a warning, rate-limited) if triggers at ``depth`` must not run."""
        if depth <= MAX_TRIGGER_DEPTH:
            return False
        self.skipped += 1
        now = time.monotonic()
        if now - self.last < WARN_INTERVAL:
            self.held += 1
            return True
        held, self.held, self.last = self.held, 0, now
        log.warning(
            "%s triggers %r not run: the event was caused by %d nested trigger firings "
            "(limit %d), a trigger that re-fires itself%s",
            self.what,
            function_ids[:5],
            depth - 1,
            MAX_TRIGGER_DEPTH,
            f" ({held} more skipped since the last warning)" if held else "",
        )
        return True
