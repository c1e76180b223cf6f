"""The cron module (``modules::cron::CronModule``): the ``cron`` trigger type.

Trigger config: ``{expression, timezone?, _condition_path? | condition_function_id?
| condition?}``; the function receives
``{trigger: "cron", job_id, scheduled_time, actual_time}`` (RFC 3339).  The
expression forms and the time-zone rules are in :mod:`.schedule`; a bad
expression or zone refuses the registration with a message naming the problem.

Firing rules:

* **Exactly once per scheduled time across engine instances**: before firing,
  the module takes the adapter's lock on ``(job, scheduled time)``, where the
  job is identified by its function and config (not the trigger id, which
  differs between workers and engines).  The lock expires after
  ``lock_ttl_ms``; it is never released early.
* **No catch-up**: a scheduled time missed by more than ``misfire_grace_ms``
  (the engine was down or busy, or the previous run was still going) is
  skipped; one missed by less fires once, including a time that passed just
  before the trigger was registered (an engine restart, a worker reconnect).
* Runs of one job do not overlap on one engine: the handler is awaited.
* Condition: ``false`` or an error skips the run, anything else runs it.

Observability: with a tracer installed, each firing this engine takes the
lock for runs under a ``cron <function_id>`` span (a new trace) with the job
id, expression, scheduled and actual times, function id and outcome
(``ok``, ``failed``, ``skipped`` by the condition, ``condition_failed``);
the condition and function calls are its children.  :meth:`Module.statistics`
counts firings by outcome, missed times and times fired elsewhere.

Lifetime: :meth:`Module.run` opens the lock adapter and a nursery; each
trigger has a task in it under its own cancel scope, cancelled when the
trigger is unregistered.  When ``engine.shutting_down`` is set every job stops
and new triggers are not started (intake stops).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from iii.adapters.cron import CronAdapterRef, CronLockAdapter, open_cron_adapter
from iii.containment import contained
from iii.errors import IIIError, TriggerRegistrationError
from iii.grants import TriggerAccess
from iii.modules import ModuleStatistics
from iii.modules.conditions import CONDITION_KEYS, condition_of, condition_passes
from iii.modules.cron.schedule import CronExpressionError, CronSchedule, parse_schedule
from iii.registry import LogicalTrigger
from iii.tracing import NoopSpan, Span

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module", "WallClock", "SystemClock", "CronJob", "rfc3339"]

log = logging.getLogger(__name__)

UTC = dt.UTC
CRON_CONDITION_KEYS = (*CONDITION_KEYS, "condition")
CRON_TRIGGER_ACCESS = TriggerAccess(function_keys=CRON_CONDITION_KEYS)


@attrs.frozen(kw_only=True)
class Config:
    adapter: CronAdapterRef = attrs.field(factory=CronAdapterRef.default)
    # A scheduled time missed by less than this still fires (once).
    misfire_grace_ms: int = 1000

    @property
    def misfire_grace(self) -> float:
        return self.misfire_grace_ms / 1000


# Firing outcomes (span attribute ``iii.cron.outcome``) and the other counted events.
_COUNTED = (
    "ok",
    "failed",
    "skipped",
    "condition_failed",
    "missed",
    "elsewhere",
    "lock_unavailable",
)


class WallClock(Protocol):
    """Where the module reads the time of day and waits for it."""

    def now(self) -> dt.datetime: ...

    async def sleep_until(self, when: dt.datetime) -> None: ...


class SystemClock:
    """The system clock; waits in slices so a clock step is noticed within a minute."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(UTC)

    async def sleep_until(self, when: dt.datetime) -> None:
        while True:
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                return
            await trio.sleep(min(remaining, 60.0))


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(UTC).isoformat()


@attrs.define(eq=False)
class CronJob:
    trigger: LogicalTrigger
    schedule: CronSchedule
    condition: str | None
    lock_key: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


def _job_key(trigger: LogicalTrigger) -> str:
    _, function_id, config = trigger.key
    digest = hashlib.sha256(function_id.encode() + b"\0" + config).hexdigest()[:24]
    return digest


def parse_trigger(trigger: LogicalTrigger) -> CronJob:
    config = trigger.config
    if not isinstance(config, dict):
        raise TriggerRegistrationError("cron trigger config must be an object with an 'expression'")
    expression = config.get("expression")
    if not isinstance(expression, str):
        raise TriggerRegistrationError("Cron expression is required (config.expression, a string)")
    timezone = config.get("timezone")
    if timezone is not None and not isinstance(timezone, str):
        raise TriggerRegistrationError("cron timezone must be a string such as 'Europe/Paris'")
    try:
        schedule = parse_schedule(expression, timezone)
    except CronExpressionError as exc:
        raise TriggerRegistrationError(f"Invalid cron expression '{expression}': {exc}") from None
    condition = condition_of(config, "cron", CRON_CONDITION_KEYS)
    return CronJob(
        trigger=trigger, schedule=schedule, condition=condition, lock_key=_job_key(trigger)
    )


class Module:
    def __init__(self, engine: Engine, config: Config, *, clock: WallClock | None = None):
        self.engine = engine
        self.config = config
        self.clock: WallClock = clock or SystemClock()
        self.jobs: dict[LogicalTrigger, CronJob] = {}
        self.locks: CronLockAdapter | None = None
        self.counts: dict[str, int] = dict.fromkeys(_COUNTED, 0)
        self._nursery: trio.Nursery | None = None

    def statistics(self) -> ModuleStatistics:
        counts = self.counts
        return ModuleStatistics(
            values={
                "jobs": len(self.jobs),  # cron triggers registered
                "fired_ok": counts["ok"],
                # the function raised (or timed out, or was not found)
                "fired_failed": counts["failed"],
                # the condition said false or failed
                "skipped_by_condition": counts["skipped"] + counts["condition_failed"],
                # scheduled times skipped: later than misfire_grace
                "missed": counts["missed"],
                # another engine instance held the lock
                "fired_elsewhere": counts["elsewhere"],
                # the lock adapter failed: the time was skipped
                "lock_unavailable": counts["lock_unavailable"],
            }
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_cron_adapter(self.config.adapter) as locks:
            if locks.lock_ttl <= self.config.misfire_grace:
                log.warning(
                    "cron lock_ttl (%.1fs) should exceed misfire_grace (%.1fs), or a late engine "
                    "instance may fire a time twice",
                    locks.lock_ttl,
                    self.config.misfire_grace,
                )
            self.locks = locks
            async with trio.open_nursery() as cron_nursery:
                self._nursery = cron_nursery
                self.engine.register_trigger_type(
                    "cron", self, description="Cron-scheduled trigger", access=CRON_TRIGGER_ACCESS
                )
                cron_nursery.start_soon(self._stop_on_shutdown)
                task_status.started()
                await trio.sleep_forever()

    async def _stop_on_shutdown(self) -> None:
        await self.engine.shutting_down.wait()
        for job in self.jobs.values():
            job.scope.cancel()

    # -- trigger type handler (synchronous) ----------------------------------------

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        job = parse_trigger(trigger)
        self.jobs[trigger] = job
        if self._nursery is None or self.engine.shutting_down.is_set():
            return
        self._nursery.start_soon(self._run_job, job)

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        job = self.jobs.pop(trigger, None)
        if job is not None:
            job.scope.cancel()

    # -- scheduling ----------------------------------------------------------------------

    async def _run_job(self, job: CronJob) -> None:
        grace = self.config.misfire_grace
        schedule = job.schedule
        with job.scope:
            now = self.clock.now()
            # A time that passed just before registration still fires (once).
            due = schedule.latest_at_or_before(now, grace) if grace > 0 else None
            if due is None:
                due = schedule.next_after(now)
            while due is not None:
                await self.clock.sleep_until(due)
                now = self.clock.now()
                if (now - due).total_seconds() > grace:
                    missed = due
                    due = schedule.latest_at_or_before(now, grace) if grace > 0 else None
                    log.info("cron %s: skipped %s (missed)", job.trigger.id, rfc3339(missed))
                    self.counts["missed"] += 1
                    if due is None:
                        due = schedule.next_after(now)
                        continue
                # Contained: an unexpected failure loses this firing, not the schedule.
                await contained(
                    f"cron {job.trigger.id!r} at {rfc3339(due)}", self._fire, job, due, now
                )
                due = schedule.next_after(due)
            log.info("cron %s: %r never fires again", job.trigger.id, schedule.expression)

    async def _fire(self, job: CronJob, scheduled: dt.datetime, now: dt.datetime) -> None:
        assert self.locks is not None
        trigger = job.trigger
        key = f"{job.lock_key}:{int(scheduled.timestamp() * 1000)}"
        try:
            if not await self.locks.try_lock(key):
                log.debug("cron %s at %s: fired elsewhere", trigger.id, rfc3339(scheduled))
                self.counts["elsewhere"] += 1
                return
        except IIIError as exc:
            log.warning(
                "cron %s at %s: skipped, lock unavailable: %s",
                trigger.id,
                rfc3339(scheduled),
                exc.message,
            )
            self.counts["lock_unavailable"] += 1
            return
        payload: dict[str, Any] = {
            "trigger": "cron",
            "job_id": trigger.id,
            "scheduled_time": rfc3339(scheduled),
            "actual_time": rfc3339(now),
        }
        tracer = self.engine.tracer
        if not tracer.enabled:
            self.counts[await self._run(job, payload, NoopSpan(None, None))] += 1
            return
        attributes = {
            "faas.trigger": "timer",
            "faas.cron": job.schedule.expression,
            "faas.time": payload["actual_time"],
            "iii.trigger.type": "cron",
            "iii.cron.job_id": trigger.id,
            "iii.cron.scheduled_time": payload["scheduled_time"],
            "function_id": trigger.function_id,
        }
        with tracer.span(f"cron {trigger.function_id}", attributes=attributes) as span:
            outcome = await self._run(job, payload, span)
            span.set_attribute("iii.cron.outcome", outcome)
        self.counts[outcome] += 1

    async def _run(self, job: CronJob, payload: dict[str, Any], span: Span) -> str:
        """The condition (if any), then the function; returns the outcome."""
        trigger = job.trigger
        if job.condition is not None:
            try:
                passes = await condition_passes(
                    self.engine,
                    job.condition,
                    payload,
                    null_passes=True,
                    what="cron",
                    traceparent=span.traceparent,
                    baggage=span.baggage,
                    grant=trigger.grant,
                )
            except IIIError as exc:
                log.warning(
                    "cron %s: condition %s failed (%s); skipped",
                    trigger.id,
                    job.condition,
                    exc.message,
                )
                span.set_error(exc.code, exc.message)
                return "condition_failed"
            if not passes:
                return "skipped"
        try:
            await self.engine.invoke(
                trigger.function_id,
                payload,
                traceparent=span.traceparent,
                baggage=span.baggage,
                grant=trigger.grant,
            )
        except IIIError as exc:
            log.warning(
                "cron %s -> %s failed: %s: %s",
                trigger.id,
                trigger.function_id,
                exc.code,
                exc.message,
            )
            span.set_error(exc.code, exc.message)
            return "failed"
        return "ok"
