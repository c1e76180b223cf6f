"""PubSub: ``modules::pubsub::PubSubModule`` (on by default; spec modules.md §6).

Function ``publish``: input ``{topic, data}``, no result.  An empty or missing
topic answers ``topic_not_set``.  Fire-and-forget: it returns once the
adapter took the message, before any subscriber runs.

Trigger type ``subscribe``: config ``{topic}``.  **Every** trigger on a topic
gets every message (upstream's Redis adapter honoured only the first one per
topic, and unsubscribing one removed all).  The handler receives the
published ``data`` exactly as published, with no envelope; results and
errors are logged and dropped.  A trigger with an empty topic is refused
(v0.4 ignored it with a warning, so the worker never learnt).

A delivery runs under the subscription's grant, one causation level deeper
than the publisher (:mod:`iii.causation`: a subscriber that re-publishes to
its own topic is bounded, with the local adapter).

Deliveries wait in a bounded queue (``QUEUED_DELIVERIES``) and run at most
``CONCURRENT_DELIVERIES`` at once, one task each (:class:`~iii.fanout.FanOut`;
an unexpected failure loses that delivery only).  Subscribers slower than the
publishers fill it, and further deliveries are then dropped with a warning
(at most one every 10 s, with a count), like upstream's broadcast channel
drops messages for a lagging receiver: pubsub is at most once, and memory
stays bounded whatever the publish rate.

Config: ``adapter`` (default ``modules::pubsub::LocalAdapter``); see
:mod:`iii.adapters.pubsub`.

Lifetime: :meth:`Module.run` opens the adapter and runs the delivery tasks
in its nursery until cancelled.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.adapters.pubsub import PubSubAdapter, PubSubAdapterRef, open_pubsub_adapter
from iii.causation import LoopWarning, current_depth, firing, trace_for_firing
from iii.errors import IIIError, TriggerRegistrationError
from iii.fanout import FanOut
from iii.grants import TriggerAccess
from iii.modules import ModuleStatistics
from iii.native import CallContext, parse_input
from iii.registry import LogicalTrigger

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module"]

log = logging.getLogger(__name__)

CONCURRENT_DELIVERIES = 256
QUEUED_DELIVERIES = 10_000
DROP_REPORT_INTERVAL = 10.0
# A subscription hands out what others publish on its topic, which no function
# reads back: a token needs invoke ["*"] or a subscribe(topic-pattern) entry.
SUBSCRIBE_TRIGGER_ACCESS = TriggerAccess(data=True, resource_key="topic")


@attrs.frozen(kw_only=True)
class Config:
    adapter: PubSubAdapterRef = attrs.field(factory=PubSubAdapterRef.default)


@attrs.frozen(kw_only=True)
class PublishInput:
    topic: str | None = None
    data: Any = None


# (trigger, data, topic, causation depth)
Delivery = tuple[LogicalTrigger, Any, str, int]


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.adapter: PubSubAdapter | None = None
        self.subscribers: dict[str, dict[LogicalTrigger, str]] = {}
        # (trigger, data, topic, causation depth): one delivery each
        self.deliveries: FanOut[Delivery] = FanOut(
            self._deliver_one,
            lambda d: f"subscribe {d[2]!r} delivery to {d[0].function_id!r}",
            queue_size=QUEUED_DELIVERIES,
            concurrency=CONCURRENT_DELIVERIES,
        )
        self.loops = LoopWarning("subscribe")
        self._running = False
        self._dropped_unreported = 0
        self._last_drop_report = -math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_pubsub_adapter(self.config.adapter, on_message=self._deliver) as adapter:
            self.adapter = adapter
            async with trio.open_nursery() as module_nursery:
                module_nursery.start_soon(self.deliveries.run)
                self._running = True
                try:
                    self.engine.register_function(
                        "publish", self.publish, description="Publish a message to a topic"
                    )
                    self.engine.register_trigger_type(
                        "subscribe",
                        self,
                        description="Topic subscription",
                        access=SUBSCRIBE_TRIGGER_ACCESS,
                    )
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._running = False

    # -- trigger type --------------------------------------------------------------

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        config = trigger.config if isinstance(trigger.config, dict) else {}
        topic = config.get("topic")
        if not isinstance(topic, str) or not topic:
            raise TriggerRegistrationError(
                "subscribe trigger config needs a non-empty string topic"
            )
        subscribers = self.subscribers.setdefault(topic, {})
        subscribers[trigger] = trigger.function_id
        if len(subscribers) == 1 and self.adapter is not None:
            self.adapter.subscribe(topic)

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        topic = trigger.config.get("topic") if isinstance(trigger.config, dict) else None
        subscribers = self.subscribers.get(topic) if isinstance(topic, str) else None
        if subscribers is None or subscribers.pop(trigger, None) is None:
            return
        if not subscribers:
            del self.subscribers[topic]  # type: ignore[arg-type]
            if self.adapter is not None:
                self.adapter.unsubscribe(topic)  # type: ignore[arg-type]

    # -- messages ------------------------------------------------------------------

    def _deliver(self, topic: str, data: Any) -> None:
        if not self._running:
            return
        subscribers = list(self.subscribers.get(topic, {}))
        cluster = self.engine.cluster
        if cluster is not None:  # an identical subscriber on a peer: one of us delivers
            subscribers = [t for t in subscribers if cluster.fires_here(t)]
        # A message published while a trigger runs (the local adapter delivers
        # in the publisher's task) is one level deeper: see iii.causation.
        depth = current_depth() + 1
        if not subscribers or self.loops.too_deep(depth, [t.function_id for t in subscribers]):
            return
        for trigger in subscribers:
            if not self.deliveries.offer((trigger, data, topic, depth)):
                self._drop(trigger.function_id, topic)

    @property
    def dropped(self) -> int:
        """Deliveries dropped because the queue was full."""
        return self.deliveries.dropped

    def _drop(self, function_id: str, topic: str) -> None:
        self._dropped_unreported += 1
        now = trio.current_time()
        if now - self._last_drop_report >= DROP_REPORT_INTERVAL:
            log.warning(
                "subscribe %s -> %s: %d deliveries dropped: %d are queued, subscribers are too slow",
                topic,
                function_id,
                self._dropped_unreported,
                QUEUED_DELIVERIES,
            )
            self._dropped_unreported = 0
            self._last_drop_report = now

    async def _deliver_one(self, delivery: Delivery) -> None:
        trigger, data, topic, depth = delivery
        engine = self.engine
        with firing(depth):
            await engine.invoke_logged(
                trigger.function_id,
                data,
                what=f"subscribe {topic!r}",
                grant=trigger.grant,
                **trace_for_firing(engine.trace_depths, engine.tracer.records_spans, depth),
            )

    async def publish(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, PublishInput, ctx.function_id)
        if not args.topic:
            raise IIIError("Topic is not set", code="topic_not_set")
        assert self.adapter is not None
        await self.adapter.publish(args.topic, args.data)
        return None

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
