"""One exec pipeline under supervision: run it, restart it, report on it.

A run (:meth:`Pipeline._run_once`) starts each command in turn with
:func:`~iii.modules.exec.process.run_command`: every command but the last is
a build step and must exit 0 (otherwise the run ends there, logged); the last
is the long-running worker.  A run ends when its worker exits.

:meth:`Pipeline.supervise` runs the pipeline again and again:

* **A restart** (:meth:`Pipeline.request_restart`, from the file watcher)
  cancels the current run: its processes are stopped (SIGTERM, then SIGKILL
  after ``stop_grace_ms``) and the pipeline starts again at once.  Requests
  that arrive while a run stops are one restart (each is logged).  Until the
  next run starts the state is ``restarting``, even for a process that was
  started just as the run was cancelled.
* **An unexpected end** (the worker exits, whatever its status, or a build
  step fails, or a command cannot be started) is restarted after a delay:
  ``restart_backoff_ms``, doubled after each consecutive quick failure, up to
  ``restart_backoff_max_ms``.  A run that lasted :data:`STABLE_AFTER` seconds
  was not a quick failure: the delay starts over.
* **A crash loop**: :data:`CRASH_LOOP_FAILURES` quick failures within
  :data:`CRASH_LOOP_WINDOW` seconds.  It is logged as an error once, the
  state says ``crash-loop``, and the pipeline keeps backing off (the delay
  is never zero, so it never busy-loops).  A file change still restarts it at
  once: that is how one fixes it.

Upstream does not restart a worker that dies; this does.

Lifetime: :meth:`Pipeline.supervise` runs in the exec module's nursery until
cancelled; each command runs as a child of it (one at a time), and is stopped
before supervise returns.
"""

from __future__ import annotations

import logging
import signal
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from iii.modules.exec.process import LineBudget, run_command

__all__ = [
    "Pipeline",
    "PipelineSettings",
    "STABLE_AFTER",
    "CRASH_LOOP_FAILURES",
    "CRASH_LOOP_WINDOW",
    "describe_status",
]

log = logging.getLogger("iii.exec")

STABLE_AFTER = 10.0
CRASH_LOOP_FAILURES = 5
CRASH_LOOP_WINDOW = 60.0


@attrs.frozen(kw_only=True)
class PipelineSettings:
    name: str
    commands: tuple[str, ...]
    stop_grace: float
    backoff: float
    backoff_max: float


def describe_status(status: int) -> str:
    """A subprocess exit status as words: ``exited 1``, ``killed by SIGKILL``."""
    if status >= 0:
        return f"exited {status}"
    try:
        return f"killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"killed by signal {-status}"


@attrs.define(eq=False)
class Pipeline:
    settings: PipelineSettings
    # The child environment, built once the engine's URL is known.
    environment: Callable[[], Mapping[str, str]]
    cwd: Path
    state: str = "waiting"
    pid: int | None = None
    command: str | None = None
    restarts: int = 0
    last_exit: int | None = None
    started_at: float | None = None
    budget: LineBudget = attrs.field(factory=LineBudget)
    _failures: deque[float] = attrs.field(factory=deque)
    _quick_failures: int = 0
    _crash_loop: bool = False
    _restart_requested: bool = False
    _run_scope: trio.CancelScope | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def request_restart(self, reason: str) -> None:
        """Stop the current run (or the wait before the next) and start again."""
        if not self._restart_requested:
            log.info("[%s] restarting: %s", self.name, reason)
        else:  # still stopping the run: one restart for both
            log.info("[%s] restart already under way, also for: %s", self.name, reason)
        self._restart_requested = True
        if self._run_scope is not None:
            self.state = "restarting"
            self._run_scope.cancel()

    def snapshot(self) -> dict[str, Any]:
        """What ``engine::exec::list`` shows for this pipeline."""
        running_for = None
        if self.started_at is not None:
            running_for = round(trio.current_time() - self.started_at, 3)
        return {
            "name": self.name,
            "exec": list(self.settings.commands),
            "command": self.command,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_exit_reason": None if self.last_exit is None else describe_status(self.last_exit),
            "seconds_since_start": running_for,
        }

    async def supervise(self) -> None:
        try:
            await self._supervise()
        finally:
            self.state = "stopped"
            self.pid = None
            self.started_at = None

    async def _supervise(self) -> None:
        delay = 0.0
        while True:
            self._restart_requested = False
            with trio.CancelScope() as scope:
                self._run_scope = scope
                if delay:
                    await trio.sleep(delay)
                began = trio.current_time()
                status = await self._run_once()
            self._run_scope = None
            self.pid = None
            self.started_at = None
            self.restarts += 1
            if scope.cancelled_caught:
                # A requested restart: at once, and the failure history starts over.
                self._failures.clear()
                self._quick_failures = 0
                self._crash_loop = False
                delay = 0.0
                continue
            delay = self._after_failure(trio.current_time() - began, status)

    def _after_failure(self, lasted: float, status: int | None) -> float:
        """Record an unexpected end; the delay before the next run."""
        now = trio.current_time()
        if lasted >= STABLE_AFTER:
            self._quick_failures = 0
        self._quick_failures += 1
        self._failures.append(now)
        while self._failures and now - self._failures[0] > CRASH_LOOP_WINDOW:
            self._failures.popleft()
        delay = min(
            self.settings.backoff * 2.0 ** min(self._quick_failures - 1, 62),
            self.settings.backoff_max,
        )
        what = "could not start" if status is None else describe_status(status)
        looping = len(self._failures) >= CRASH_LOOP_FAILURES
        if looping and not self._crash_loop:
            log.error(
                "[%s] crash loop: %d failures in %gs; "
                "restarting with backoff (now %gs, at most %gs)",
                self.name,
                len(self._failures),
                CRASH_LOOP_WINDOW,
                delay,
                self.settings.backoff_max,
            )
        self._crash_loop = looping
        self.state = "crash-loop" if looping else "backoff"
        log.warning("[%s] %s; restarting in %gs", self.name, what, delay)
        return delay

    async def _run_once(self) -> int | None:
        """One run of the pipeline: the build steps, then the worker until it exits.

        Returns the exit status that ended the run, or None when a command
        could not be started.
        """
        environment = self.environment()
        token = uuid.uuid4().hex  # marks every process of this run (see process.py)
        commands = self.settings.commands
        for index, command in enumerate(commands):
            last = index == len(commands) - 1
            if not self._restart_requested:
                self.state = "starting"
            self.command = command
            log.info("[%s] starting: %s", self.name, command)
            try:
                status = await run_command(
                    command,
                    name=self.name,
                    env=environment,
                    token=token,
                    grace=self.settings.stop_grace,
                    cwd=self.cwd,
                    budget=self.budget,
                    on_start=partial(self._started, "running" if last else "building"),
                )
            except OSError as exc:
                log.error("[%s] cannot start %r: %s", self.name, command, exc)
                return None
            finally:
                self.pid = None
            self.last_exit = status
            if last:
                return status
            if status != 0:
                log.error(
                    "[%s] build step %r %s: the pipeline stops here",
                    self.name,
                    command,
                    describe_status(status),
                )
                return status
        raise AssertionError("a pipeline has at least one command")

    def _started(self, state: str, pid: int) -> None:
        # A process that started after its run was cancelled is about to be
        # stopped: the listing keeps saying so rather than "running".
        if not self._restart_requested:
            self.state = state
        self.pid = pid
        self.started_at = trio.current_time()
