"""The queue module (``modules::queue::QueueModule``): durable jobs with retries and a DLQ.

Intake:

* ``enqueue {topic, data}``: a job for the ``queue`` triggers on ``topic``
  (all triggers on a topic compete for its jobs, as upstream v0.4).  It
  answers once the job is durable; an empty topic is ``topic_not_set``.
* ``engine::queue::enqueue {queue, function_id, data, messageReceiptId, …}``:
  what the core calls for an ``invokefunction`` with
  ``action: {type: "enqueue", queue: Q}``; the job calls ``function_id`` with
  ``data``.  Such *function queues* are stored apart from topics (adapter name
  ``@Q``) and have a dispatcher of their own, whether or not ``Q`` is listed in
  ``queue_configs``.

Trigger type ``queue``: ``{topic, _condition_path? | condition_function_id?,
concurrency?, message_group_field?, metadata?: {infrastructure: {queue: {type,
maxRetries, concurrency, backoffDelayMs}}}}``.  The function receives the job's
``data`` as it was enqueued.

Grants (:mod:`iii.grants`): ``engine::queue::enqueue`` checks its
``function_id`` against the caller's token and records the token's name in
the job (a restricted token only); the job's call is made under that token's
grant when it runs, and a trigger's jobs under the trigger's grant.  So a
redrive re-runs each job under the grant of whoever named its function.

Processing (:mod:`.consumer`): at least once on every adapter; a failed
attempt (the function's error, ``timeout``, ``function_not_found``, a failing
condition) is retried after ``backoff_ms · 2^(attempt-1)`` until
``max_attempts`` runs, then the job goes to the queue's DLQ.  A job cut off
because its trigger went away (its worker disconnected) is released for
redelivery without counting an attempt.  Per-trigger concurrency; ``fifo``
runs one job at a time in order; with ``message_group_field`` one job at a
time per group value, in order (within one consumer).

Inspection and DLQ functions (:mod:`.functions`):
``engine::queue::{list_topics, topic_stats, dlq_topics, dlq_messages}`` and
``iii::queue::{redrive, redrive_message, discard_message}``.

Observability: with a tracer installed, every attempt at a job runs under a
``queue <topic>`` span (kind consumer), child of the context stored with the
job (the enqueuer's), with the topic or queue, function id, attempt and
outcome as attributes; the function's call is its child.  :meth:`Module.statistics`
gives job counts and per-queue depth (:mod:`.stats`), shown by ``/metrics``
and ``engine::metrics::list``.

Lifetime: :meth:`Module.run` opens the adapter (closed last) and a nursery
holding one consumer task per trigger and per function queue; each runs under
its own cancel scope.  When ``engine.shutting_down`` is set consumers stop
taking jobs and let the ones in flight finish.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio

from iii.adapters.queue import Job, QueueAdapter, QueueAdapterRef, open_queue_adapter
from iii.config_schema import Count, check
from iii.errors import AdapterUnavailableError, IIIError, TriggerRegistrationError
from iii.grants import Grant, TriggerAccess
from iii.log import bounded_repr
from iii.modules import ModuleStatistics
from iii.modules.conditions import CONDITION_KEYS, condition_of
from iii.modules.queue.consumer import Subscription, run_subscription
from iii.modules.queue.functions import register_functions
from iii.modules.queue.names import FUNCTION_QUEUE_PREFIX
from iii.modules.queue.stats import QueueCounters, QueueDepth, read_depth, snapshot
from iii.registry import LogicalTrigger

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module", "QueueSettings", "FUNCTION_QUEUE_PREFIX"]

log = logging.getLogger(__name__)

# A queue trigger names its condition and consumes the jobs of its topic (taking
# them from the other consumers): a token needs invoke ["*"] or queue(topic-pattern).
QUEUE_TRIGGER_ACCESS = TriggerAccess(function_keys=CONDITION_KEYS, data=True, resource_key="topic")


@attrs.frozen(kw_only=True)
class QueueSettings:
    """One ``queue_configs`` entry (HEAD's names), for a function queue or a topic."""

    max_retries: int | None = attrs.field(
        default=None, validator=check(lambda n: n is None or n >= 0, "must be at least 0")
    )  # retries after the first attempt
    concurrency: Count | None = None
    type: Literal["standard", "fifo"] = "standard"
    message_group_field: str | None = None
    backoff_ms: Count | None = None
    poll_interval_ms: Count | None = None


@attrs.frozen(kw_only=True)
class Config:
    adapter: QueueAdapterRef = attrs.field(factory=QueueAdapterRef.default)
    queue_configs: dict[str, QueueSettings] = attrs.field(factory=dict)


def _positive(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TriggerRegistrationError(
            f"queue trigger {what} must be a positive integer, got {bounded_repr(value)}"
        )
    return value


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.instance_id = uuid.uuid4().hex[:12]
        self.adapter: QueueAdapter | None = None
        self.subscriptions: dict[LogicalTrigger, Subscription] = {}
        self.dispatchers: dict[str, Subscription] = {}
        self.counters = QueueCounters()
        self._depth: tuple[QueueDepth, ...] = ()
        self._depth_read_at: float | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_queue_adapter(self.config.adapter) as adapter:
            self.adapter = adapter
            async with trio.open_nursery() as queue_nursery:
                self._nursery = queue_nursery
                register_functions(self)
                self.engine.register_trigger_type(
                    "queue",
                    self,
                    description="Durable queue subscription",
                    access=QUEUE_TRIGGER_ACCESS,
                )
                try:
                    known = set(await adapter.list_queues())
                except AdapterUnavailableError as exc:
                    # A backend that reconnects by itself (the Bridge's link) may be
                    # down at start: the function queues start on their next enqueue.
                    log.warning("queue: cannot list the queues at start: %s", exc.message)
                    known = set()
                for name in self.config.queue_configs:
                    known.add(FUNCTION_QUEUE_PREFIX + name)
                for name in sorted(known):
                    if name.startswith(FUNCTION_QUEUE_PREFIX):
                        self.ensure_dispatcher(name[len(FUNCTION_QUEUE_PREFIX) :])
                task_status.started()
                await trio.sleep_forever()

    # -- numbers -----------------------------------------------------------------------

    def statistics(self) -> ModuleStatistics:
        """Job counts now, and queue depth as of the last :meth:`refresh_statistics`."""
        return snapshot(self, self._depth, self._depth_read_at)

    async def refresh_statistics(self) -> None:
        """Read every queue's depth from the backend (bounded; kept as is on failure)."""
        depth = await read_depth(self)
        if depth is not None:
            self._depth = depth
            self._depth_read_at = time.time()

    def in_flight(self) -> int:
        subscriptions = (*self.subscriptions.values(), *self.dispatchers.values())
        return sum(len(sub.held) for sub in subscriptions)

    def display_name(self, queue: str) -> tuple[str, str]:
        """(the name users see, ``"topic"`` or ``"queue"``) of an adapter queue name."""
        if queue.startswith(FUNCTION_QUEUE_PREFIX):
            return queue[len(FUNCTION_QUEUE_PREFIX) :], "queue"
        return queue, "topic"

    # -- jobs --------------------------------------------------------------------------

    def new_job(
        self,
        queue: str,
        data: Any,
        *,
        settings_name: str,
        job_id: str | None = None,
        function_id: str | None = None,
        traceparent: str | None = None,
        baggage: str | None = None,
        grant: Grant | None = None,
    ) -> Job:
        assert self.adapter is not None
        defaults = self.adapter.defaults
        settings = self.config.queue_configs.get(settings_name)
        max_attempts = defaults.max_attempts
        backoff_ms = defaults.backoff_ms
        if settings is not None:
            if settings.max_retries is not None:
                max_attempts = settings.max_retries + 1
            if settings.backoff_ms is not None:
                backoff_ms = settings.backoff_ms
        return Job(
            id=job_id or str(uuid.uuid4()),
            queue=queue,
            data=data,
            max_attempts=max_attempts,
            backoff_ms=backoff_ms,
            created_at=int(time.time() * 1000),
            function_id=function_id,
            traceparent=traceparent,
            baggage=baggage,
            grant=grant.name if grant is not None and not grant.unrestricted else None,
        )

    def job_grant(self, job: Job, sub: Subscription) -> Grant | None:
        """The grant a job's call is made under: its enqueuer's, or its trigger's."""
        if job.function_id is None:
            return sub.grant
        return self.engine.authenticator.grant_named(job.grant)

    async def store(self, job: Job) -> None:
        assert self.adapter is not None
        try:
            await self.adapter.enqueue(job)
        except (AdapterUnavailableError, OSError) as exc:
            message = exc.message if isinstance(exc, IIIError) else str(exc)
            log.error("enqueue to %s failed: %s", job.queue, message)
            raise IIIError(
                f"Failed to enqueue to {job.queue}: {message}", code="enqueue_error"
            ) from exc
        self.counters.enqueued += 1

    def ensure_dispatcher(self, queue: str) -> None:
        """Start the consumer of function queue ``queue`` if it is not running."""
        if queue in self.dispatchers or self._nursery is None or self.engine.shutting_down.is_set():
            return
        assert self.adapter is not None
        settings = self.config.queue_configs.get(queue, QueueSettings())
        defaults = self.adapter.defaults
        fifo = settings.type == "fifo" or defaults.fifo
        sub = Subscription(
            name=f"{self.instance_id}:fnq:{queue}",
            queue=FUNCTION_QUEUE_PREFIX + queue,
            function_id=None,
            condition=None,
            concurrency=1
            if fifo and not settings.message_group_field
            else (settings.concurrency or defaults.concurrency),
            group_field=settings.message_group_field,
            max_attempts=None,
            backoff_ms=None,
            poll_interval=(settings.poll_interval_ms or defaults.poll_interval_ms) / 1000,
        )
        self.dispatchers[queue] = sub
        self._nursery.start_soon(run_subscription, self, sub)

    # -- the ``queue`` trigger type (synchronous) -------------------------------------------

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        sub = self._parse_trigger(trigger)
        self.subscriptions[trigger] = sub
        if self._nursery is not None and not self.engine.shutting_down.is_set():
            self._nursery.start_soon(run_subscription, self, sub)

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        sub = self.subscriptions.pop(trigger, None)
        if sub is not None:
            sub.scope.cancel()

    def _parse_trigger(self, trigger: LogicalTrigger) -> Subscription:
        assert self.adapter is not None
        config = trigger.config
        if not isinstance(config, dict):
            raise TriggerRegistrationError("queue trigger config must be an object with a 'topic'")
        topic = config.get("topic")
        if not isinstance(topic, str) or not topic:
            raise TriggerRegistrationError("queue trigger needs a non-empty 'topic'")
        condition = condition_of(config, "queue")
        infra: dict[str, Any] = {}
        for source in (trigger.metadata, config.get("metadata")):
            if isinstance(source, dict):
                candidate = (
                    (source.get("infrastructure") or {}).get("queue")
                    if isinstance(source.get("infrastructure"), dict)
                    else None
                )
                if isinstance(candidate, dict):
                    infra.update(candidate)
        queue_type = infra.get("type", "standard")
        if queue_type not in ("standard", "fifo"):
            raise TriggerRegistrationError(
                f"queue trigger type must be 'standard' or 'fifo', got {bounded_repr(queue_type)}"
            )
        group_field = config.get("message_group_field")
        if group_field is not None and (not isinstance(group_field, str) or not group_field):
            raise TriggerRegistrationError("queue trigger message_group_field must be a field name")
        defaults = self.adapter.defaults
        concurrency = (
            _positive(config.get("concurrency"), "concurrency")
            or _positive(infra.get("concurrency"), "metadata concurrency")
            or defaults.concurrency
        )
        fifo = queue_type == "fifo" or defaults.fifo
        if fifo and group_field is None:
            concurrency = 1
        max_retries = infra.get("maxRetries")
        if max_retries is not None and (
            isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0
        ):
            raise TriggerRegistrationError(
                "queue trigger maxRetries must be a non-negative integer"
            )
        return Subscription(
            name=f"{self.instance_id}:{trigger.id}",
            queue=topic,
            grant=trigger.grant,
            function_id=trigger.function_id,
            condition=condition,
            concurrency=concurrency,
            group_field=group_field,
            max_attempts=None if max_retries is None else max_retries + 1,
            backoff_ms=_positive(infra.get("backoffDelayMs"), "backoffDelayMs"),
            poll_interval=defaults.poll_interval,
        )
