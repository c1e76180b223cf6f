"""Firing change triggers (``state``, ``stream``) after a write, without blocking it.

A module hands each change event to :meth:`TriggerDispatch.submit` (sync,
never waits).  A :class:`~iii.fanout.FanOut` gives every event its own task,
at most 64 at once; that task runs the matching triggers **one after another**
(spec modules.md §4.3, §5): for each, the condition function first (when the
trigger has ``condition_function_id``: a result of ``false`` or ``null``, or
an error, skips it), then the handler, both under the trigger's grant.
Results and errors of handlers are logged, never returned to the writer.

In a cluster (:mod:`iii.cluster`) every engine receives every change, and
an identical trigger (same type, function and config) may be registered on
several engines: only one of them, the lowest engine id among those that
hold it, fires it (``Cluster.fires_here``).

Each event carries the causation depth of the task that produced it, and its
triggers run one level deeper; past the limit they are not run
(:mod:`iii.causation`): a trigger that re-fires itself is bounded.

If events arrive faster than they can be dispatched and the queue is full,
the newest is dropped with a warning: a write is never slowed down by its
triggers.

:class:`PeerPublisher` does the same for the other engines sharing a
backend (Redis): :meth:`~PeerPublisher.submit` queues an event without
waiting, :meth:`~PeerPublisher.run` hands them to the adapter in order, and a
failure is logged (the write has already answered).

An unexpected exception while one event is dispatched ends that event's
calls only (logged, :mod:`iii.containment`), never the module.

Lifetime: :meth:`TriggerDispatch.run` and :meth:`PeerPublisher.run` run in
the owning module's nursery; cancelling it cancels the trigger calls in
flight and drops the events not yet published.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from iii.causation import LoopWarning, current_depth, firing, trace_for_firing
from iii.errors import IIIError, TriggerRegistrationError
from iii.fanout import FanOut
from iii.modules.conditions import CHANGE_CONDITION_KEYS, condition_of, condition_passes
from iii.registry import LogicalTrigger

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["TriggerDispatch", "PeerPublisher", "config_str"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
CONCURRENT_EVENTS = 64


def config_str(config: Any, name: str, trigger_type: str) -> str | None:
    """An optional string key of a trigger config ("" means any, like missing)."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise TriggerRegistrationError(f"{trigger_type} trigger config must be an object")
    value = config.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TriggerRegistrationError(f"{trigger_type} trigger config: {name} must be a string")
    return value


class TriggerDispatch:
    """The trigger type handler and the event fan-out of one change-trigger type."""

    def __init__(
        self,
        engine: Engine,
        trigger_type: str,
        *,
        parse: Callable[[Any], Any],
        matches: Callable[[Any, dict[str, Any]], bool],
    ):
        self.engine = engine
        self.trigger_type = trigger_type
        self._parse = parse  # trigger config -> filter (raises TriggerRegistrationError)
        self._matches = matches  # (filter, event) -> bool
        self.triggers: dict[LogicalTrigger, tuple[Any, str | None]] = {}
        # (event, causation depth of the task that produced it)
        self.events: FanOut[tuple[dict[str, Any], int]] = FanOut(
            self._fire,
            lambda _: f"{trigger_type} trigger event",
            queue_size=QUEUE_SIZE,
            concurrency=CONCURRENT_EVENTS,
        )
        self.loops = LoopWarning(trigger_type)

    # -- TriggerTypeHandler --------------------------------------------------------

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        condition = condition_of(trigger.config, self.trigger_type, CHANGE_CONDITION_KEYS)
        self.triggers[trigger] = (self._parse(trigger.config), condition)

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        self.triggers.pop(trigger, None)

    # -- events ---------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return self.events.dropped

    def submit(self, event: dict[str, Any]) -> None:
        if not self.triggers:
            return
        if not self.events.offer((event, current_depth())):
            log.warning(
                "%s triggers: %d events queued; event dropped", self.trigger_type, QUEUE_SIZE
            )

    async def run(self) -> None:
        await self.events.run()

    async def _fire(self, queued: tuple[dict[str, Any], int]) -> None:
        """Run the triggers that match one event, one after another."""
        event, producer_depth = queued
        depth = producer_depth + 1
        cluster = self.engine.cluster
        matching = [
            (trigger, condition)
            for trigger, (filter_, condition) in list(self.triggers.items())
            if self._matches(filter_, event)
            # an identical trigger on a peer engine: one of us fires it
            and (cluster is None or cluster.fires_here(trigger))
        ]
        if not matching or self.loops.too_deep(depth, [t.function_id for t, _ in matching]):
            return
        engine = self.engine
        with firing(depth):
            for trigger, condition in matching:
                # Each call under the registrants' grant, traceable to this depth.
                calls: dict[str, Any] = {
                    "grant": trigger.grant,
                    **trace_for_firing(engine.trace_depths, engine.tracer.records_spans, depth),
                }
                if condition is not None and not await self._condition_passes(
                    condition, event, calls
                ):
                    continue
                await engine.invoke_logged(
                    trigger.function_id, event, what=f"{self.trigger_type} trigger", **calls
                )

    async def _condition_passes(
        self, condition: str, event: dict[str, Any], calls: dict[str, Any]
    ) -> bool:
        try:
            return await condition_passes(
                self.engine, condition, event, null_passes=False, what=self.trigger_type, **calls
            )
        except IIIError as exc:
            log.warning(
                "%s trigger condition %s failed: %s: %s",
                self.trigger_type,
                condition,
                exc.code,
                exc.message,
            )
            return False


class PeerPublisher:
    """Events made here, on their way to the other engines sharing the backend."""

    def __init__(self, what: str):
        self.what = what  # "state", "stream": for the log
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](QUEUE_SIZE)

    def submit(self, event: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            log.warning(
                "%s: peer event queue full; an event did not reach the other engines", self.what
            )

    async def run(self, publish: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        async for event in self._receive:
            try:
                await publish(event)
            except IIIError as exc:
                log.warning("%s: event not sent to the other engines: %s", self.what, exc.message)
