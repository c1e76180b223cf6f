"""The queue module's numbers: job outcomes counted as they settle, and queue depth.

* :class:`QueueCounters` (live, owned by the module) counts jobs stored and
  the outcome of every attempt (``OUTCOMES``), on this engine.
* Depth lives in the backend, so reading it is I/O: :func:`read_depth` asks
  the adapter for each known queue's ``waiting / delayed / active / dlq``
  (bounded by ``DEPTH_TIMEOUT``; a backend that does not answer leaves the
  previous reading in place).  The observability module awaits
  :meth:`Module.refresh_statistics` before each ``/metrics`` scrape and
  ``engine::metrics::list``, so what they show is fresh.
* :func:`snapshot` is what :meth:`Module.statistics` returns (the
  :class:`~iii.modules.ModuleStatistics` every module returns): the counters
  now, and the table ``depth`` of the last reading (one row per queue,
  labelled ``topic`` and ``kind``).

Synchronous values only; no task of its own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from iii.errors import AdapterUnavailableError
from iii.modules import ModuleStatistics, StatisticsRow

if TYPE_CHECKING:
    from iii.modules.queue import Module

__all__ = ["OUTCOMES", "QueueCounters", "QueueDepth", "read_depth", "snapshot"]

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

    def row(self) -> StatisticsRow:
        return StatisticsRow(
            labels={"topic": self.topic, "kind": self.kind},
            values={
                "waiting": self.waiting,
                "delayed": self.delayed,
                "active": self.active,
                "dlq": self.dlq,
            },
        )


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
) -> ModuleStatistics:
    counters = module.counters.by_outcome
    return ModuleStatistics(
        values={
            "jobs_enqueued": module.counters.enqueued,  # stored by this engine
            "jobs_succeeded": counters["ack"],  # acked after the function returned
            "jobs_skipped": counters["skipped"],  # acked because the condition said false
            "jobs_retried": counters["retry"],  # failed attempts scheduled again
            "jobs_dead_lettered": counters["dead_letter"],
            # handed back unprocessed (trigger gone, shutdown)
            "jobs_released": counters["released"],
            "jobs_in_flight": module.in_flight(),  # held by this engine's consumers now
            "subscriptions": len(module.subscriptions),  # queue triggers
            "function_queues": len(module.dispatchers),  # dispatchers of enqueue-action queues
            # time.time() of the last depth reading, None before one
            "depth_read_at": depth_read_at,
        },
        # per queue, as of depth_read_at
        tables={"depth": [queue.row() for queue in depth]},
    )
