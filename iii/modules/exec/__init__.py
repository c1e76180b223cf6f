"""Exec: ``modules::shell::ExecModule`` runs and supervises the project's workers.

Upstream's module is described in spec modules.md §10; this one goes further.

Config (unknown keys are an error, as upstream)::

    - class: modules::shell::ExecModule
      config:
        exec: ["npm ci", "node server.js"]   # required, at least one command
        watch: ["steps/**/*.{ts,js}"]        # optional: restart on a change
        name: web                            # optional (ours): the log prefix
        stop_grace_ms: 5000                  # SIGTERM -> SIGKILL (ours)
        restart_backoff_ms: 1000             # first restart delay (ours)
        restart_backoff_max_ms: 30000        # its cap (ours)

* ``exec``: shell commands, each run as ``sh -c`` in the engine's working
  directory; every one but the last is a build step that must exit 0, the
  last is the long-running worker (:mod:`.pipeline`).
* ``watch``: globs relative to the working directory (:mod:`.globs`); a
  create, change, delete or rename of a matching file restarts the pipeline.
  Changes are debounced by watchfiles (a Rust core; its anyio API runs on
  trio): a burst with less than :data:`WATCH_QUIET_MS` between changes is
  one restart, and a longer storm gives at most one every
  :data:`WATCH_MAX_GROUP_MS`.
* Every process runs in its own process group and is stopped with SIGTERM,
  then SIGKILL after ``stop_grace_ms``, grandchildren included, on a restart
  and when the engine stops (:mod:`.process`).
* Beyond upstream, an unexpected exit is restarted with exponential backoff,
  and a crash loop is logged (:mod:`.pipeline`).
* The child environment is the engine's, plus ``III_URL`` and
  ``III_BRIDGE_URL`` (the engine's worker URL: the 0.25 SDK and Motia read
  the first, 0.4.1 the second) and ``PYTHONUNBUFFERED=1`` (so Python workers' lines reach the log as
  they are printed), each only when not already set; a ``PYTHONPATH`` entry
  holding the engine's own ``iii`` package is left out
  (:func:`worker_environment`).
* Each output line goes to the engine log (logger ``iii.exec``) as
  ``[name] line`` (``[name:stderr]`` for stderr), bounded (:mod:`.process`).

The module may be listed several times, one pipeline each (the exception to
"a module listed twice is an error", :attr:`ModuleSpec.repeatable`).  Each
pipeline has a unique ``name``; by default the program of its last command
(``motia`` for ``.venv/bin/motia run``), with ``-2``, ``-3`` … added when
another pipeline has it (:func:`name_instances`).

Function ``engine::exec::list`` (input ignored) answers ``{"pipelines": [...]}``
with, for each pipeline: ``name``, ``exec``, ``command`` (the one running or
last run), ``pid``, ``state`` (``waiting``, ``starting``, ``building``,
``running``, ``restarting``, ``backoff``, ``crash-loop``, ``stopped``), ``restarts``,
``last_exit`` (an exit status, ``-N`` for signal N) with
``last_exit_reason``, and ``seconds_since_start`` of the current process.

Lifetime: :meth:`Module.run` owns the pipeline's supervisor and its file
watcher in its own nursery; the processes run inside the supervisor, which
is the tree reaching out to the workers: cancelling the module stops them.
Processes start once the engine is ready (its worker port is bound).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio
from watchfiles import Change, awatch

from iii.config_schema import FieldValueError
from iii.modules import ModuleStatistics
from iii.modules.exec.globs import WatchPatterns, check_pattern
from iii.modules.exec.pipeline import Pipeline, PipelineSettings
from iii.modules.instances import unique_names
from iii.native import CallContext

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = [
    "Config",
    "Module",
    "name_instances",
    "engine_url",
    "worker_environment",
    "LIST_FUNCTION",
]

log = logging.getLogger("iii.exec")

LIST_FUNCTION = "engine::exec::list"
WATCH_QUIET_MS = 200
WATCH_MAX_GROUP_MS = 2000
WATCH_TICK_MS = 1000
# A watcher that failed (a root removed, the inotify watch limit) tries again.
WATCH_RETRY = 5.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@attrs.frozen(kw_only=True)
class Config:
    exec: tuple[str, ...]
    # upstream accepts null for "no watch"
    watch: tuple[str, ...] | None = None
    name: str = ""
    stop_grace_ms: int = 5000
    restart_backoff_ms: int = 1000
    restart_backoff_max_ms: int = 30_000

    def __attrs_post_init__(self) -> None:
        if not self.exec:
            raise FieldValueError("exec", "must list at least one command")
        for index, command in enumerate(self.exec):
            if not command.strip():
                raise FieldValueError(f"exec[{index}]", "an empty command")
            if "\0" in command:
                raise FieldValueError(f"exec[{index}]", "a NUL character in the command")
        for index, pattern in enumerate(self.watch or ()):
            reason = check_pattern(pattern)
            if reason is not None:
                raise FieldValueError(f"watch[{index}]", f"{reason}: {pattern!r}")
        if self.name and not _NAME.fullmatch(self.name):
            raise FieldValueError(
                "name",
                f"{self.name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit",
            )
        if self.stop_grace_ms < 0:
            raise FieldValueError("stop_grace_ms", f"must be at least 0, got {self.stop_grace_ms}")
        if self.restart_backoff_ms < 1:
            raise FieldValueError(
                "restart_backoff_ms", f"must be at least 1, got {self.restart_backoff_ms}"
            )
        if self.restart_backoff_max_ms < self.restart_backoff_ms:
            raise FieldValueError(
                "restart_backoff_max_ms",
                f"must be at least restart_backoff_ms ({self.restart_backoff_ms}), "
                f"got {self.restart_backoff_max_ms}",
            )


def _program_name(command: str) -> str:
    """``motia`` for ``.venv/bin/motia run --dir steps``; ``exec`` when there is none."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    # Skip leading VAR=value assignments and ``exec``.
    while words and ("=" in words[0].split("/")[0] or words[0] == "exec"):
        words = words[1:]
    program = os.path.basename(words[0]) if words else ""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "", program).lstrip("._-")[:48]
    return cleaned or "exec"


def name_instances(configs: list[Config], *, file: str | None, keys: list[str]) -> list[Config]:
    """Give every pipeline a unique name (see the module docstring); ``keys`` locate errors."""
    return unique_names(
        configs,
        what="exec pipelines",
        default_name=lambda config: _program_name(config.exec[-1]),
        file=file,
        keys=keys,
    )


# The directory the engine's own ``iii`` package was imported from.
_ENGINE_PATH = Path(__file__).resolve().parents[3]


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment for a worker, without the engine's own source on PYTHONPATH.

    The official Python SDK's package is also named ``iii``: an engine run from
    a source checkout (``PYTHONPATH=/src/iii python -m iii serve``) would
    otherwise hand its own package to Python workers in place of the SDK's.
    Every other entry, and every other variable, is kept.
    """
    environment = dict(environ)
    path = environment.get("PYTHONPATH")
    if path:
        kept = [entry for entry in path.split(os.pathsep) if not _is_engine_path(entry)]
        if kept:
            environment["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            del environment["PYTHONPATH"]
    return environment


def _is_engine_path(entry: str) -> bool:
    try:
        return bool(entry) and Path(entry).resolve() == _ENGINE_PATH
    except OSError:
        return False


def engine_url(engine: Engine) -> str:
    """The URL a worker on this host reaches the engine's worker port with."""
    host = engine.config.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "wss" if engine.config.tls.enabled else "ws"
    return f"{scheme}://{host}:{engine.listen_port}"


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.cwd = Path.cwd()
        self.pipeline = Pipeline(
            settings=PipelineSettings(
                name=config.name or _program_name(config.exec[-1]),
                commands=config.exec,
                stop_grace=config.stop_grace_ms / 1000,
                backoff=config.restart_backoff_ms / 1000,
                backoff_max=config.restart_backoff_max_ms / 1000,
            ),
            environment=self._environment,
            cwd=self.cwd,
        )
        self.patterns = WatchPatterns(self.cwd, config.watch) if config.watch else None
        # Set while the file watcher has its roots registered.
        self.watching = False

    def _environment(self) -> dict[str, str]:
        environment = worker_environment(os.environ)
        url = engine_url(self.engine)
        environment.setdefault("III_URL", url)
        environment.setdefault("III_BRIDGE_URL", url)
        environment.setdefault("PYTHONUNBUFFERED", "1")
        return environment

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if LIST_FUNCTION not in self.engine.registry.functions:
            # One function for every exec entry: the first module registers it.
            self.engine.register_function(
                LIST_FUNCTION, self._list, description="The exec pipelines and their processes"
            )
        async with trio.open_nursery() as module_nursery:
            module_nursery.start_soon(self._supervise)
            if self.patterns is not None:
                module_nursery.start_soon(self._watch, self.patterns)
            task_status.started()

    async def _supervise(self) -> None:
        await self.engine.ready.wait()  # its worker port is bound: the URL is known
        await self.pipeline.supervise()

    async def _list(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        pipelines = [
            module.pipeline.snapshot()
            for module in self.engine.modules.values()
            if isinstance(module, Module)
        ]
        return {"pipelines": pipelines}

    # -- watching ---------------------------------------------------------------------------

    async def _watch(self, patterns: WatchPatterns) -> None:
        while True:
            try:
                await self._watch_once(patterns)
            except Exception as exc:  # watching is lost, not the worker
                log.error(
                    "[%s] watching %s failed: %s; trying again in %gs",
                    self.pipeline.name,
                    list(patterns.patterns),
                    exc,
                    WATCH_RETRY,
                )
            await trio.sleep(WATCH_RETRY)

    async def _watch_once(self, patterns: WatchPatterns) -> None:
        roots = patterns.roots()

        def wanted(change: Change, path: str) -> bool:
            return patterns.matches(path)

        # awatch waits in a thread (watchfiles' anyio API), which polls the
        # stop event: a cancellation reaches it through this task, which sets
        # the event on its way out.  The thread also comes back every
        # WATCH_TICK_MS with no change: the first time says the watch is set up.
        stop = trio.Event()
        try:
            async with trio.open_nursery() as watch_nursery:
                watch_nursery.start_soon(_set_on_cancel, stop)
                async for changes in awatch(
                    *(root.path for root in roots),
                    watch_filter=wanted,
                    recursive=any(root.recursive for root in roots),
                    debounce=WATCH_MAX_GROUP_MS,
                    step=WATCH_QUIET_MS,
                    stop_event=stop,
                    rust_timeout=WATCH_TICK_MS,
                    yield_on_timeout=True,
                ):
                    if not self.watching:
                        self.watching = True
                        log.info(
                            "[%s] watching %s under %s",
                            self.pipeline.name,
                            list(patterns.patterns),
                            [str(root.path) for root in roots],
                        )
                    if not changes:
                        continue
                    paths = sorted(_relative(path, self.cwd) for _, path in changes)
                    shown = ", ".join(repr(path) for path in paths[:3])
                    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
                    self.pipeline.request_restart(f"changed: {shown}{more}")
                watch_nursery.cancel_scope.cancel()
        finally:
            self.watching = False

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


async def _set_on_cancel(event: trio.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        event.set()
