"""The queue module's numbers: job outcomes counted as they settle, and queue depth.

* :class:`QueueCounters` (live, owned by the module) counts jobs stored and
  the outcome of every attempt (``OUTCOMES``), on this engine.
* Depth lives in the backend, so reading it is I/O: :func:`read_depth` asks
  the adapter for each known queue's ``waiting / delayed / active / dlq``
  (bounded by ``DEPTH_TIMEOUT``; a backend that does not answer leaves the
  previous reading in place).  The observability module awaits
  :meth:`Module.refresh_statistics` before each ``/metrics`` scrape and
  ``engine::metrics::list``, so what they show is fresh.
* :class:`QueueStatistics` is the frozen snapshot :meth:`Module.statistics`
  returns (trio's ``statistics()`` convention): the counters now, the depth of
  the last reading.

Synchronous values only; no task of its own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from iii.errors import AdapterUnavailableError

if TYPE_CHECKING:
    from iii.modules.queue import Module

__all__ = ["OUTCOMES", "QueueCounters", "QueueDepth", "QueueStatistics", "read_depth"]

log = logging.getLogger(__name__)

# What an attempt at a job ended in.
OUTCOMES = ("ack", "skipped", "retry", "dead_letter", "released")

DEPTH_TIMEOUT = 5.0


@attrs.define(eq=False)
class QueueCounters:
    enqueued: int = 0
    by_outcome: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(OUTCOMES, 0))

    def count(self, outcome: str) -> None:
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1


@attrs.frozen(kw_only=True)
class QueueDepth:
    """Job counts of one topic or function queue, as the backend reported them."""

    topic: str  # the name users see (a function queue without its "@")
    kind: str  # "topic" or "queue" (a function queue fed by enqueue actions)
    waiting: int
    delayed: int  # waiting for a retry's backoff
    active: int  # leased to a consumer (in flight)
    dlq: int


@attrs.frozen(kw_only=True)
class QueueStatistics:
    jobs_enqueued: int  # stored by this engine
    jobs_succeeded: int  # acked after the function returned
    jobs_skipped: int  # acked because the condition said false
    jobs_retried: int  # failed attempts scheduled again
    jobs_dead_lettered: int
    jobs_released: int  # handed back unprocessed (trigger gone, shutdown)
    jobs_in_flight: int  # held by this engine's consumers now
    subscriptions: int  # queue triggers
    function_queues: int  # dispatchers of enqueue-action queues
    depth: tuple[QueueDepth, ...]  # per queue, as of ``depth_read_at``
    depth_read_at: float | None  # time.time() of the last depth reading, None before one


async def read_depth(module: Module) -> tuple[QueueDepth, ...] | None:
    """Every known queue's depth, or None if the backend did not answer in time."""
    adapter = module.adapter
    if adapter is None:
        return None
    with trio.move_on_after(DEPTH_TIMEOUT):
        try:
            names = set(await adapter.list_queues())
            names.update(sub.queue for sub in module.subscriptions.values())
            names.update(sub.queue for sub in module.dispatchers.values())
            depth = []
            for name in sorted(names):
                stats = await adapter.stats(name)
                shown, kind = module.display_name(name)
                depth.append(
                    QueueDepth(
                        topic=shown,
                        kind=kind,
                        waiting=stats.waiting,
                        delayed=stats.delayed,
                        active=stats.active,
                        dlq=stats.dlq,
                    )
                )
            return tuple(depth)
        except (AdapterUnavailableError, OSError) as exc:
            log.warning("queue depth unavailable: %s", exc)
            return None
    log.warning("queue depth unavailable: the backend did not answer in %gs", DEPTH_TIMEOUT)
    return None


def snapshot(
    module: Module, depth: tuple[QueueDepth, ...], depth_read_at: float | None
) -> QueueStatistics:
    counters = module.counters.by_outcome
    return QueueStatistics(
        jobs_enqueued=module.counters.enqueued,
        jobs_succeeded=counters["ack"],
        jobs_skipped=counters["skipped"],
        jobs_retried=counters["retry"],
        jobs_dead_lettered=counters["dead_letter"],
        jobs_released=counters["released"],
        jobs_in_flight=module.in_flight(),
        subscriptions=len(module.subscriptions),
        function_queues=len(module.dispatchers),
        depth=depth,
        depth_read_at=depth_read_at,
    )
