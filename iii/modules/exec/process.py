"""One command of an exec pipeline as a process tree: start it, read its output, stop all of it.

:func:`run_command` runs ``sh -c COMMAND`` in its own session (so its own
process group, ``setsid`` like upstream), in the engine's working directory,
with stdin from ``/dev/null`` and stdout/stderr piped into the engine log.  It
returns the exit status (``subprocess`` style: ``-N`` for signal N) once the
command has exited; whatever the command left behind is stopped before it
returns.  When it is cancelled (a restart, the engine stopping) it stops the
tree first, shielded, and then lets the cancellation through.

**Stopping a tree** (:func:`stop_tree`): SIGTERM to the process group and to
every other process of the run, then up to ``grace`` seconds for all of them
to go, then SIGKILL to whatever is left, repeated until nothing is.  "The
processes of a run" are found on Linux in ``/proc``:

* every process in the run's process group (``sh -c``, ``uv run``, ``motia
  run`` and the children they fork without ``setsid``);
* every process whose environment carries the run's token
  (``III_EXEC_RUN=<token>``), which catches a grandchild that left the group
  (``setsid``, a double-forked daemon): children inherit the environment;
* every descendant of those.

Zombies are skipped (their parent, maybe init, reaps them).  ``/proc`` is read
directly: psutil would add a C extension for these two reads.  Elsewhere only
the process group is signalled.

**Output** (:func:`pump_output`): each line goes to the engine log prefixed
with the pipeline's name, escaped and cut at :data:`MAX_LINE_BYTES`; a line
without an end is cut there and the rest of it skipped.  A child that floods
its output cannot stall the engine: lines past :data:`LINES_PER_SECOND`
(after a burst of :data:`LINE_BURST`) are dropped, counted in bulk (a chunk
is not split into lines while nothing may be logged) and reported at most
once a second; and reading slows down past :data:`BYTES_PER_SECOND`, so the
flood's pipe fills and the child, not the engine, waits.

Lifetime: a call of :func:`run_command` owns its process and its two output
pumps (its own nursery); nothing outlives the call.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import trio

from iii.log import escape, truncate

__all__ = [
    "run_command",
    "stop_tree",
    "run_members",
    "pump_output",
    "LineBudget",
    "RUN_TOKEN_VARIABLE",
    "MAX_LINE_BYTES",
    "LINES_PER_SECOND",
    "LINE_BURST",
    "BYTES_PER_SECOND",
]

log = logging.getLogger("iii.exec")

RUN_TOKEN_VARIABLE = "III_EXEC_RUN"
MAX_LINE_BYTES = 4000
LINES_PER_SECOND = 200.0
LINE_BURST = 1000
BYTES_PER_SECOND = 8 * 1024 * 1024
READ_SIZE = 65536
# How often a stop looks again for processes that are not our children.
STOP_POLL = 0.05
# After SIGKILL: rounds of looking and killing again (a fork that raced the kill).
KILL_ROUNDS = 20
# Output still in the pipes once the tree is gone: read for at most this long.
DRAIN_TIMEOUT = 2.0
_PROC = Path("/proc")


# -- finding a run's processes -----------------------------------------------------------


@attrs.frozen
class _Proc:
    pid: int
    ppid: int
    pgid: int


def _processes() -> list[_Proc]:
    """Every live (not zombie) process in /proc; [] where there is no /proc."""
    found = []
    try:
        entries = list(os.scandir(_PROC))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = text[text.rfind(b")") + 2 :].split()
        if len(fields) < 3 or fields[0] in (b"Z", b"X"):
            continue
        found.append(_Proc(int(entry.name), int(fields[1]), int(fields[2])))
    return found


def _has_token(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return marker in b"\0" + environ.read()
    except OSError:
        return False  # gone, or not ours to read


def run_members(pgid: int, token: str) -> set[int]:
    """The live processes of a run: its group, its token's bearers, their descendants."""
    processes = _processes()
    own = os.getpid()
    marker = f"\0{RUN_TOKEN_VARIABLE}={token}\0".encode()
    members = {p.pid for p in processes if p.pgid == pgid}
    members |= {p.pid for p in processes if p.pid not in members and _has_token(p.pid, marker)}
    children: dict[int, list[int]] = {}
    for p in processes:
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in members:
                members.add(child)
                stack.append(child)
    members.discard(own)
    return members


def _signal_all(pgid: int, pids: set[int], signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


async def stop_tree(process: trio.Process, token: str, grace: float, *, name: str) -> None:
    """SIGTERM the run's processes, SIGKILL what is left after ``grace``; reap ``process``.

    Call it shielded: it must finish even while its caller is cancelled.
    Each wait is bounded.
    """
    pgid = process.pid  # setsid: the leader's pid is the group's id
    members = await trio.to_thread.run_sync(run_members, pgid, token)
    if process.returncode is None or members:
        _signal_all(pgid, members, signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
            # The kernel gives no event when a group's last member exits: polled.
            while await trio.to_thread.run_sync(run_members, pgid, token):  # noqa: ASYNC110
                await trio.sleep(STOP_POLL)
    for _ in range(KILL_ROUNDS):
        members = await trio.to_thread.run_sync(run_members, pgid, token)
        if process.returncode is None:
            members.add(process.pid)
        if not members:
            break
        log.warning(
            "[%s] %d process(es) still running %gs after SIGTERM: SIGKILL",
            name,
            len(members),
            grace,
        )
        _signal_all(pgid, members, signal.SIGKILL)
        with trio.move_on_after(1.0):
            await process.wait()
        await trio.sleep(STOP_POLL)
    else:
        log.error("[%s] processes survive SIGKILL: %s", name, sorted(members)[:20])
    if process.returncode is None:
        # SIGKILLed above; the wait cannot hang for long (only a process stuck
        # in the kernel delays it).
        with trio.move_on_after(10.0):
            await process.wait()


# -- output --------------------------------------------------------------------------------


@attrs.define
class LineBudget:
    """Lines one pipeline may log: a token bucket, with a count of those dropped.

    Drops are reported at most once per ``report_interval`` (and when the
    output ends), not once per line let through.
    """

    rate: float = LINES_PER_SECOND
    burst: int = LINE_BURST
    report_interval: float = 1.0
    tokens: float = attrs.field(
        default=attrs.Factory(lambda self: float(self.burst), takes_self=True)
    )
    dropped: int = 0
    _last: float = -math.inf
    _last_report: float = -math.inf

    def exhausted(self, now: float) -> bool:
        """No line may be logged now (a flood: its lines are counted in bulk)."""
        self._refill(now)
        return self.tokens < 1

    def _refill(self, now: float) -> None:
        if self._last != -math.inf:
            self.tokens = min(float(self.burst), self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False

    def report(self, prefix: str, now: float, *, final: bool = False) -> None:
        """Log the count of dropped lines, if any and if one is due."""
        if not self.dropped or (not final and now - self._last_report < self.report_interval):
            return
        dropped, self.dropped, self._last_report = self.dropped, 0, now
        log.warning(
            "%s %d lines of output dropped (more than %g lines/s)", prefix, dropped, self.rate
        )


def _emit(
    prefix: str, line: bytes, budget: LineBudget, *, cut: int = 0, ended: bool = True
) -> None:
    now = trio.current_time()
    budget.report(prefix, now)
    if not budget.take(now):
        return
    # The line is the project's own program's output: escaped (one record per
    # line, no terminal control) and bounded here, so it is logged as is.
    text = escape(line.decode("utf-8", errors="replace"))
    if not ended:
        text = text[:MAX_LINE_BYTES] + "… (line cut)"
    elif cut or len(text) > MAX_LINE_BYTES:
        text = truncate(text, MAX_LINE_BYTES, already_cut=cut)
    log.info("%s %s", prefix, text)


@attrs.define
class _Lines:
    """Splits a byte stream into bounded lines (see :func:`pump_output`)."""

    prefix: str
    budget: LineBudget
    pending: bytes = b""
    skipping: bool = False  # in the rest of an over-long line, whose head was logged

    def feed(self, chunk: bytes) -> None:
        pieces = chunk.split(b"\n")
        for index, piece in enumerate(pieces):
            ended = index < len(pieces) - 1
            if self.skipping:
                self.skipping = not ended
                continue
            self.pending += piece
            if ended:
                cut = max(0, len(self.pending) - MAX_LINE_BYTES)
                _emit(self.prefix, self.pending[:MAX_LINE_BYTES], self.budget, cut=cut)
                self.pending = b""
            elif len(self.pending) > MAX_LINE_BYTES:
                _emit(self.prefix, self.pending[:MAX_LINE_BYTES], self.budget, ended=False)
                self.pending, self.skipping = b"", True

    def drop(self, chunk: bytes) -> None:
        """Like :meth:`feed` when no line may be logged: count, without splitting."""
        ends = chunk.count(b"\n")
        if not ends:
            if not self.skipping:
                self.pending += chunk
                if len(self.pending) > MAX_LINE_BYTES:
                    self.budget.dropped += 1
                    self.pending, self.skipping = b"", True
            return
        self.budget.dropped += ends - (1 if self.skipping else 0)
        self.pending, self.skipping = b"", False
        self.drop(chunk[chunk.rfind(b"\n") + 1 :])

    def close(self) -> None:
        if self.pending:
            _emit(self.prefix, self.pending, self.budget)
        self.budget.report(self.prefix, trio.current_time(), final=True)


async def pump_output(stream: trio.abc.ReceiveStream, prefix: str, budget: LineBudget) -> None:
    """Log ``stream`` line by line until its end; see the module docstring for the bounds."""
    lines = _Lines(prefix, budget)
    window_start = trio.current_time()
    window_bytes = 0
    while chunk := await stream.receive_some(READ_SIZE):
        now = trio.current_time()
        if now - window_start >= 1.0:
            window_start, window_bytes = now, 0
        window_bytes += len(chunk)
        if window_bytes > BYTES_PER_SECOND:
            await trio.sleep_until(window_start + 1.0)  # the child's pipe fills; it waits
        if budget.exhausted(trio.current_time()):
            lines.drop(bytes(chunk))
            budget.report(prefix, trio.current_time())
        else:
            lines.feed(bytes(chunk))
    lines.close()


# -- one command ---------------------------------------------------------------------------


async def run_command(
    command: str,
    *,
    name: str,
    env: Mapping[str, str],
    token: str,
    grace: float,
    cwd: Path,
    budget: LineBudget,
    on_start: Callable[[int], None],
) -> int:
    """Run ``sh -c command`` to its end and return its exit status (see the module docstring).

    ``on_start`` is given the process id once it runs.  Raises ``OSError`` when
    it cannot be started (no ``sh``, the working directory gone).
    """
    process = await trio.lowlevel.open_process(
        ["sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**env, RUN_TOKEN_VARIABLE: token},
        cwd=cwd,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        async with trio.open_nursery() as output_nursery:
            output_nursery.start_soon(pump_output, process.stdout, f"[{name}]", budget)
            output_nursery.start_soon(pump_output, process.stderr, f"[{name}:stderr]", budget)
            on_start(process.pid)
            try:
                await process.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await stop_tree(process, token, grace, name=name)
                    # The pipes end once every writer is gone; what is left in them
                    # is still logged, for a bounded time.
                    output_nursery.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT
    finally:
        with trio.CancelScope(shield=True):
            await process.stdout.aclose()
            await process.stderr.aclose()
    assert process.returncode is not None
    return process.returncode
