"""Running one subscription: receive jobs, call the function, ack / retry / dead-letter.

A :class:`Subscription` is a ``queue`` trigger or a function-queue dispatcher.
:func:`run_subscription` owns, under the subscription's cancel scope, one
adapter consumer and a nursery of job tasks:

* at most ``concurrency`` jobs are held at once (a slot is taken before
  ``receive``, so a backend never leases more than that);
* with ``group_field``, jobs whose ``data[group_field]`` is equal run one after
  another in arrival order, the others wait in the group's line (holding
  their slot and lease);
* a lease keeper renews the leases of held jobs every third of the
  visibility timeout, so a long job is not redelivered while it runs;
* ack / retry / dead-letter / release are shielded from cancellation (with a
  timeout), so a job is never left half-settled by a cancel; if the backend
  is unreachable the lease simply runs out and the job comes back.

If the consumer cannot be opened (backend down) it is retried with backoff.
When the engine starts shutting down, intake stops and the jobs in flight
are left to finish (the engine's grace period bounds them).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.adapters.queue import Delivery, QueueConsumer
from iii.containment import contained, describe_failure
from iii.errors import AdapterUnavailableError, IIIError
from iii.grants import Grant
from iii.modules.conditions import condition_passes
from iii.tracing import NoopSpan, Span

if TYPE_CHECKING:
    from iii.modules.queue import Module

__all__ = ["Subscription", "run_subscription", "MAX_BACKOFF"]

log = logging.getLogger(__name__)

MAX_BACKOFF = 3600.0
SETTLE_TIMEOUT = 10.0


@attrs.define(eq=False)
class Subscription:
    name: str  # the consumer name at the backend
    queue: str  # adapter queue name (a topic, or "@<function queue>")
    function_id: str | None  # None: call each job's own function_id
    condition: str | None
    concurrency: int
    group_field: str | None
    max_attempts: int | None  # overrides the job's when set
    backoff_ms: int | None
    poll_interval: float
    grant: Grant | None = None  # a trigger's registrants' token (None: a function queue)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    processed: int = 0
    held: set[Delivery] = attrs.field(factory=set)  # leased to this consumer now

    def group_of(self, data: Any) -> str | None:
        if self.group_field is None:
            return None
        if isinstance(data, dict) and self.group_field in data:
            return repr(data[self.group_field])
        return ""  # jobs without the field share one group


async def run_subscription(module: Module, sub: Subscription) -> None:
    assert module.adapter is not None
    delay = 0.5
    with sub.scope:
        while not module.engine.shutting_down.is_set():
            failure: BaseException | None = None
            try:
                async with module.adapter.open_consumer(
                    sub.queue, sub.name, sub.concurrency
                ) as consumer:
                    delay = 0.5
                    await _consume(module, sub, consumer)
                return
            except* (AdapterUnavailableError, OSError) as group:  # raised through the job nursery
                failure = group.exceptions[0]
            log.warning(
                "queue %s: consumer %s failed (%s); retrying in %.1fs",
                sub.queue,
                sub.name,
                failure,
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _consume(module: Module, sub: Subscription, consumer: QueueConsumer) -> None:
    engine = module.engine
    assert module.adapter is not None
    slots = trio.Semaphore(sub.concurrency)
    held = sub.held
    held.clear()
    groups: dict[str, deque[Delivery]] = {}
    async with trio.open_nursery() as job_nursery:
        job_nursery.start_soon(
            _keep_leases, consumer, held, module.adapter.defaults.visibility_timeout
        )
        try:
            while not engine.shutting_down.is_set():
                await slots.acquire()
                try:
                    delivery = await consumer.receive(
                        timeout=min(max(sub.poll_interval, 0.05) * 10, 1.0)
                    )
                except BaseException:
                    slots.release()
                    raise
                if delivery is None:
                    slots.release()
                    continue
                held.add(delivery)
                group = sub.group_of(delivery.job.data)
                if group is not None:
                    if group in groups:
                        groups[group].append(delivery)
                        continue
                    groups[group] = deque()
                job_nursery.start_soon(
                    _run_line, module, sub, consumer, delivery, group, slots, held, groups
                )
        finally:
            # Intake is over: jobs waiting in a group line go back unprocessed.
            waiting = [d for line in groups.values() for d in line]
            for line in groups.values():
                line.clear()
            for delivery in waiting:
                held.discard(delivery)
                await _settle(consumer.release(delivery), sub, "release")
        # Let the jobs in flight finish, then stop the lease keeper.  Polled:
        # once per shutdown, and each job leaves ``held`` on its own path.
        while held:  # noqa: ASYNC110
            await trio.sleep(0.05)
        job_nursery.cancel_scope.cancel()


async def _run_line(
    module: Module,
    sub: Subscription,
    consumer: QueueConsumer,
    delivery: Delivery,
    group: str | None,
    slots: trio.Semaphore,
    held: set[Delivery],
    groups: dict[str, deque[Delivery]],
) -> None:
    """Process ``delivery``, then (for a group) the group's waiting jobs in order."""
    try:
        while True:
            try:
                # Contained: an unexpected failure ends this attempt only (the
                # job is released, see _attempt); the line goes on.
                what = f"queue {sub.queue!r} job {delivery.job.id!r}"
                await contained(what, _process, module, sub, consumer, delivery)
            finally:
                held.discard(delivery)
            if group is None:
                return
            line = groups.get(group)
            if not line:
                groups.pop(group, None)
                return
            slots.release()
            delivery = line.popleft()
    finally:
        slots.release()


async def _settle(operation: Any, sub: Subscription, what: str) -> None:
    """Await an ack/retry/dead-letter/release, shielded from cancellation."""
    with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_TIMEOUT) as scope:
        try:
            await operation
        except (AdapterUnavailableError, OSError) as exc:
            log.warning(
                "queue %s: %s failed (%s); the job comes back when its lease ends",
                sub.queue,
                what,
                exc,
            )
    if scope.cancelled_caught:
        log.warning(
            "queue %s: %s timed out; the job comes back when its lease ends", sub.queue, what
        )


async def _process(
    module: Module, sub: Subscription, consumer: QueueConsumer, delivery: Delivery
) -> None:
    """One attempt at a job, under a ``consumer`` span (child of the enqueuer's context)."""
    job = delivery.job
    tracer = module.engine.tracer
    if not tracer.enabled:
        await _attempt(module, sub, consumer, delivery, NoopSpan(job.traceparent, job.baggage))
        return
    shown, kind = module.display_name(sub.queue)
    attributes: dict[str, Any] = {
        "messaging.system": "iii",
        "messaging.operation.type": "process",
        "messaging.destination.name": shown,
        "messaging.message.id": job.id,
        "iii.queue.kind": kind,
        "iii.queue.attempt": job.attempts_made + 1,
        "iii.queue.max_attempts": sub.max_attempts or job.max_attempts,
    }
    target = job.function_id or sub.function_id
    if target is not None:
        attributes["function_id"] = target
    if kind == "topic":
        attributes["iii.queue.topic"] = shown
    else:
        attributes["iii.queue.name"] = shown
    with tracer.span(
        f"queue {shown}",
        kind="consumer",
        traceparent=job.traceparent,
        baggage=job.baggage,
        attributes=attributes,
    ) as span:
        outcome = await _attempt(module, sub, consumer, delivery, span)
        span.set_attribute("iii.queue.outcome", outcome)


async def _attempt(
    module: Module, sub: Subscription, consumer: QueueConsumer, delivery: Delivery, span: Span
) -> str:
    """Run the job once and settle it; returns the outcome (one of :data:`.stats.OUTCOMES`)."""
    engine = module.engine
    counters = module.counters
    job = delivery.job
    target = job.function_id or sub.function_id
    outcome = "released"
    try:
        if target is None:
            span.set_error("no_function", "the job has no function_id")
            await _settle(
                consumer.dead_letter(delivery, job, "no function: the job has no function_id"),
                sub,
                "dead-letter",
            )
            outcome = "dead_letter"
            return outcome
        grant = module.job_grant(job, sub)
        try:
            if sub.condition is not None and not await condition_passes(
                engine,
                sub.condition,
                job.data,
                null_passes=True,
                what="queue",
                traceparent=span.traceparent,
                baggage=span.baggage,
                grant=grant,
            ):
                await _settle(consumer.ack(delivery), sub, "ack")
                outcome = "skipped"
                return outcome
            await engine.invoke(
                target, job.data, traceparent=span.traceparent, baggage=span.baggage, grant=grant
            )
        except IIIError as exc:
            if sub.scope.cancel_called:
                return outcome  # the trigger went away mid-call (its worker left): released below
            span.set_error(exc.code, exc.message)
            outcome = await _failed(sub, consumer, delivery, f"{exc.code}: {exc.message}")
            return outcome
        except Exception as exc:
            # A bug, not an answer: it fails this attempt like an error does
            # (backoff, then the DLQ).  Released, the job would come straight
            # back and fail again, thousands of times a second.
            log.error(
                "queue %r: job %r failed inside the engine: %s",
                sub.queue,
                job.id,
                describe_failure(exc),
            )
            span.set_error("invocation_error", type(exc).__name__)
            error = f"invocation_error: {type(exc).__name__}"
            outcome = await _failed(sub, consumer, delivery, error)
            return outcome
        await _settle(consumer.ack(delivery), sub, "ack")
        sub.processed += 1
        outcome = "ack"
        return outcome
    finally:
        if outcome == "released":
            await _settle(consumer.release(delivery), sub, "release")
        counters.count(outcome)


async def _failed(
    sub: Subscription, consumer: QueueConsumer, delivery: Delivery, error: str
) -> str:
    job = delivery.job
    attempts = job.attempts_made + 1
    max_attempts = sub.max_attempts or job.max_attempts
    failed = attrs.evolve(job, attempts_made=attempts)
    if attempts >= max_attempts:
        log.warning(
            "queue %s: job %s failed %d times (%s); moved to the DLQ",
            sub.queue,
            job.id,
            attempts,
            error,
        )
        await _settle(consumer.dead_letter(delivery, failed, error), sub, "dead-letter")
        return "dead_letter"
    backoff = (sub.backoff_ms or job.backoff_ms) / 1000
    delay = min(backoff * 2 ** (attempts - 1), MAX_BACKOFF)
    log.info(
        "queue %s: job %s attempt %d failed (%s); retry in %.1fs",
        sub.queue,
        job.id,
        attempts,
        error,
        delay,
    )
    await _settle(consumer.retry(delivery, failed, delay), sub, "retry")
    return "retry"


async def _keep_leases(
    consumer: QueueConsumer, held: set[Delivery], visibility_timeout: float
) -> None:
    while True:
        await trio.sleep(visibility_timeout / 3)
        if held:
            try:
                await consumer.extend(list(held))
            except (AdapterUnavailableError, OSError) as exc:
                log.warning("renewing queue leases failed: %s", exc)
