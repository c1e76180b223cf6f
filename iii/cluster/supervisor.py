"""``python -m iii serve --processes N``: one engine process per core, as one cluster.

A small trio program.  It starts N engine processes (``python -m iii serve
--processes 1`` with the same config file and ``III_REUSE_PORT=1``): they
share the worker, REST and stream ports through ``SO_REUSEPORT``
(:mod:`iii.binding`), each also listens on a private port for its peers, and
they form a cluster through the config's ``cluster`` section
(:mod:`iii.cluster`).  Because each process has its own memory, this needs
the shared state to be in Redis: :func:`check_processes_config` refuses a
config without a ``cluster`` section, with a state, stream, pubsub, queue
or cron module on a non-shared adapter, or with a module's own file store
(the kv_server's ``file_based``: every process would open the one file) (exit 2).

Supervision tree::

    trio.run
    └── supervise                     supervisor nursery
        ├── signal watcher            SIGTERM/SIGINT -> forwarded to every child, then wait
        │                             (a child's config error, exit 2, does the same)
        ├── readiness (one per child) its datagram socket: READY=1 / WATCHDOG=1
        ├── watchdog                  WATCHDOG=1 to systemd (after READY), from this loop
        └── Child.run (one per child) start the process, wait for it; a crash is
                                      restarted with backoff (0.5 s doubling to 10 s;
                                      reset after a minute up); a child that stops
                                      pinging its watchdog is killed and restarted

A child whose supervisor died (even by SIGKILL) reads EOF on its stdin, a
pipe the supervisor holds, and stops gracefully (:func:`watch_supervisor`):
no engine outlives its supervisor.

Under systemd (``NOTIFY_SOCKET``) the supervisor sends ``READY=1`` only when
every child has sent its own ``READY=1`` (each child's ``NOTIFY_SOCKET`` is the
supervisor's socket), and pings systemd's watchdog itself.  On SIGTERM it
sends SIGTERM to every child and waits for them (each child drains
gracefully); a child still running ``shutdown_grace + 10`` seconds later is
killed.  Exit status: 0 after a requested stop.  A child that exits with 2
(a config error its own start found, e.g. two processes given one file
store's directory) is not restarted, since a restart cannot fix it: the
supervisor stops the other children the same way and exits 2 itself, so
systemd's ``RestartPreventExitStatus=2`` holds for the whole tree.

Lifetime: the whole process; each child is a task in the supervisor nursery.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from iii.adapters.kvstore import KvStoreConfig
from iii.binding import REUSE_PORT_ENV
from iii.config_schema import EngineConfig
from iii.errors import ConfigError
from iii.sd_notify import Notifier

__all__ = [
    "check_processes_config",
    "process_count",
    "supervise",
    "Child",
    "watch_supervisor",
    "SUPERVISED_ENV",
]

SUPERVISED_ENV = "III_SUPERVISED"

log = logging.getLogger(__name__)

SHARED_KINDS = {
    "modules::state::StateModule": "state",
    "modules::stream::StreamModule": "stream",
    "modules::pubsub::PubSubModule": "pubsub",
    "modules::queue::QueueModule": "queue",
    "modules::cron::CronModule": "cron",
}
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
STABLE_AFTER = 60.0
# A child's exit status for a config error (iii.cli.ExitCode.CONFIG): not restarted.
CONFIG_ERROR_EXIT = 2
# The watchdog the supervisor gives each child (it pings every half of it).
CHILD_WATCHDOG_S = 20.0


def process_count(config: EngineConfig) -> int:
    value = config.processes
    if value is None:
        return 1
    if value == "auto":
        return max(
            1,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        )
    assert isinstance(value, int)
    return value


def check_processes_config(config: EngineConfig, file: str | None) -> None:
    """Several processes need a cluster and shared adapters; else a ConfigError (exit 2)."""
    if config.cluster is None:
        raise ConfigError(
            "processes > 1 needs a cluster section (the processes form a cluster)",
            file=file,
            key="processes",
        )
    for index, entry in enumerate(config.modules):
        if isinstance(entry.config, KvStoreConfig) and entry.config.file_based:
            # Every process reads the same file: each would open the same store.
            key = entry.key or f"modules[{index}]"
            raise ConfigError(
                f"processes > 1 cannot share one file store ({entry.config.file_path}): "
                "each process would open it; use store_method: in_memory, or one engine",
                file=file,
                key=f"{key}.store_method" if entry.key else "processes",
            )
        kind = SHARED_KINDS.get(entry.class_name)
        if kind is None:
            continue
        adapter = getattr(entry.config, "adapter", None)
        class_name = getattr(adapter, "class_name", "") or ""
        if not any(word in class_name for word in ("Redis", "RabbitMQ", "Amqp")):
            key = entry.key or f"modules[{index}]"
            raise ConfigError(
                f"processes > 1 needs the {kind} module on a Redis (or RabbitMQ) adapter, "
                f"got {class_name or 'the default in-memory one'}",
                file=file,
                key=f"{key}.adapter" if entry.key else "processes",
            )


@attrs.define(eq=False)
class Child:
    index: int
    command: list[str]
    env: dict[str, str]
    shutdown_wait: float
    # Called with the exit status when the child exits with a config error.
    on_config_error: Callable[[int], None] = lambda code: None
    process: trio.Process | None = None
    ready: bool = False
    starts: int = 0
    last_ping: float = 0.0
    stopping: bool = False
    # Set when run() returns (the child was stopped and has exited).
    done: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.done.set()

    async def _run(self) -> None:
        attempt = 0
        while not self.stopping:
            self.ready = False
            self.starts += 1
            started = trio.current_time()
            self.last_ping = started
            # The child's stdin is a pipe we never write: if this process dies
            # (even by SIGKILL), the child reads EOF and stops (watch_supervisor).
            process = await trio.lowlevel.open_process(
                self.command, env=self.env, stdin=subprocess.PIPE
            )
            self.process = process
            log.info("child %d started (pid %d)", self.index, process.pid)
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # cancelled: do not leave it behind
                    with trio.CancelScope(shield=True):
                        await self._stop(process)
            self.process = None
            if self.stopping:
                log.info("child %d exited (%s)", self.index, code)
                return
            if code == CONFIG_ERROR_EXIT:
                log.error(
                    "child %d exited with %d (a config error): not restarted; stopping",
                    self.index,
                    code,
                )
                self.on_config_error(code)
                return
            if trio.current_time() - started > STABLE_AFTER:
                attempt = 0
            delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2**attempt)
            attempt += 1
            log.warning("child %d exited with %s; restarting in %.1fs", self.index, code, delay)
            await trio.sleep(delay)

    def signal(self, signum: int) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                pass

    async def _stop(self, process: trio.Process) -> None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.shutdown_wait):
            await process.wait()
            return
        log.warning("child %d did not stop in %.0fs: killed", self.index, self.shutdown_wait)
        process.kill()
        await process.wait()


def _child_command(file: str | None, log_level: str) -> list[str]:
    command = [sys.executable, "-m", "iii", "--log-level", log_level, "serve", "--processes", "1"]
    if file is not None:
        command += ["--config", file]
    return command


async def supervise(
    config: EngineConfig,
    file: str | None,
    processes: int,
    *,
    log_level: str = "info",
    notifier: Notifier | None = None,
) -> int:
    notifier = notifier or Notifier.from_environ()
    shutdown_wait = config.shutdown_grace + 10.0
    with tempfile.TemporaryDirectory(prefix="iii-supervisor-") as tmp:
        sockets = []
        env = {
            key: value
            for key, value in os.environ.items()
            if key
            not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
        }
        children = []
        for index in range(processes):
            notify_path = str(Path(tmp) / f"notify-{index}.sock")
            notify_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await notify_sock.bind(notify_path)
            sockets.append(notify_sock)
            child_env = {
                **env,
                REUSE_PORT_ENV: "1",
                SUPERVISED_ENV: "1",
                "III_PROCESS_INDEX": str(index),
                "NOTIFY_SOCKET": notify_path,
                "WATCHDOG_USEC": str(int(CHILD_WATCHDOG_S * 1_000_000)),
            }
            children.append(Child(index, _child_command(file, log_level), child_env, shutdown_wait))
        all_ready = trio.Event()
        stop_requested = trio.Event()
        exit_code = 0

        def request_stop(code: int) -> None:
            nonlocal exit_code
            if not stop_requested.is_set():
                exit_code = code
                stop_requested.set()

        for child in children:
            child.on_config_error = request_stop
        try:
            async with trio.open_nursery() as supervisor_nursery:
                await supervisor_nursery.start(_watch_signals, request_stop, processes)
                for child, notify_sock in zip(children, sockets, strict=True):
                    supervisor_nursery.start_soon(
                        _read_notifications, notify_sock, child, children, all_ready
                    )
                supervisor_nursery.start_soon(_watch_children, children)
                for child in children:
                    supervisor_nursery.start_soon(child.run)
                supervisor_nursery.start_soon(_report_ready, notifier, all_ready, processes)
                await stop_requested.wait()
                notifier.notify("STOPPING=1")
                for child in children:
                    child.stopping = True
                    child.signal(signal.SIGTERM)
                with trio.move_on_after(shutdown_wait) as wait_scope:
                    for child in children:
                        await child.done.wait()
                if wait_scope.cancelled_caught:
                    for child in children:
                        child.signal(signal.SIGKILL)
                supervisor_nursery.cancel_scope.cancel()
        finally:
            for notify_sock in sockets:
                notify_sock.close()
            notifier.close()
    return exit_code


async def _watch_signals(
    request_stop: Callable[[int], None],
    processes: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM or SIGINT: a requested stop (exit 0)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: stopping %d children", signal.Signals(signum).name, processes)
            request_stop(0)


async def _report_ready(notifier: Notifier, all_ready: trio.Event, processes: int) -> None:
    await all_ready.wait()
    notifier.notify("READY=1", f"STATUS={processes} engine processes ready")
    log.info("all %d engine processes are ready", processes)
    await notifier.run_watchdog()


async def _read_notifications(
    sock: trio.socket.SocketType, child: Child, children: list[Child], all_ready: trio.Event
) -> None:
    """READY=1 and WATCHDOG=1 datagrams from one child (each has its own socket)."""
    while True:
        data, _ = await sock.recvfrom(4096)
        fields = set(data.decode("utf-8", "replace").split("\n"))
        if child.process is None:
            continue
        child.last_ping = trio.current_time()
        if "READY=1" in fields and not child.ready:
            child.ready = True
            log.info("child %d ready", child.index)
        if all(c.ready for c in children):
            all_ready.set()


async def _watch_children(children: list[Child]) -> None:
    """Kill a child whose event loop stopped pinging (it is then restarted)."""
    while True:
        await trio.sleep(CHILD_WATCHDOG_S / 4)
        now = trio.current_time()
        for child in children:
            if (
                child.process is not None
                and child.ready
                and now - child.last_ping > CHILD_WATCHDOG_S
            ):
                log.warning("child %d stopped pinging its watchdog: killed", child.index)
                child.signal(signal.SIGKILL)


async def watch_supervisor(request_shutdown: Callable[[], None]) -> None:
    """In a child: stop gracefully when the supervisor is gone (EOF on stdin)."""
    async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
        while await stdin.receive_some(4096):
            pass
    log.warning("the supervisor is gone: shutting down")
    request_shutdown()
