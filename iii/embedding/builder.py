"""The :class:`EngineBuilder`: an embedded engine's config, native functions
and trigger types, and the way to run it (see :mod:`iii.embedding`).

Lifetime: a builder is a plain value until :meth:`EngineBuilder.open` or
:meth:`EngineBuilder.serve` runs an engine from it; it may run several, one
after the other or side by side.
"""

from __future__ import annotations

import copy
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from iii.config import EngineConfig, ModuleEntry, parse_config, read_config_tree
from iii.embedding.native import (
    FunctionHandler,
    NativeFunction,
    NativeType,
    TriggerTypeHandler,
    register_native_function,
    register_native_trigger_type,
)
from iii.embedding.running import RunningEngine, StartedAsRunning
from iii.embedding.thread import EngineThread
from iii.engine import Engine
from iii.modules import DEFAULT_MODULES
from iii.serve import serve_engine

__all__ = ["EngineBuilder"]


class EngineBuilder:
    """Collects an engine's config, native functions and trigger types.

    Each method returns the builder, so calls chain.  Nothing is checked until
    :meth:`build_config` (which :meth:`open` and :meth:`serve` call): then the
    whole tree is validated by :func:`iii.config.parse_config`, the CLI's
    validation, and a problem raises :class:`~iii.errors.ConfigError` naming
    the key (``modules[0].config.port``) and, for a tree read from a file,
    the file.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self._raw: dict[str, Any] = copy.deepcopy(config) if config is not None else {}
        self._file: str | None = None
        self._free_ports: str | None = None  # the host, once free_ports() was called
        self._worker_port_free = False
        self._env: dict[str, str] | None = None
        self._functions: dict[str, NativeFunction] = {}
        self._trigger_types: dict[str, NativeType] = {}

    # -- where the config comes from -------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EngineBuilder:
        """Start from a YAML or TOML config file, read as ``iii serve -c`` reads it."""
        raw = read_config_tree(path)
        if raw is not None and not isinstance(raw, dict):
            return cls._invalid(raw, str(path))
        builder = cls(raw)
        builder._file = str(path)
        return builder

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> EngineBuilder:
        """Start from a config tree shaped like the file (``{"modules": [...], ...}``)."""
        if not isinstance(config, dict):
            return cls._invalid(config, None)
        return cls(config)

    @classmethod
    def _invalid(cls, raw: Any, file: str | None) -> EngineBuilder:
        parse_config(raw, file=file)  # raises the CLI's error for a non-mapping top level
        raise AssertionError("unreachable")

    def environ(self, env: dict[str, str]) -> EngineBuilder:
        """Expand ``${VAR}`` references from ``env`` instead of ``os.environ``
        (token secrets are read from it too)."""
        self._env = dict(env)
        return self

    # -- engine keys ------------------------------------------------------------------------

    def set(self, key: str, value: Any) -> EngineBuilder:
        """Set a top-level engine key (``invocation_timeout_ms``, ``auth``, ``tls`` …)."""
        if key == "modules":
            raise ValueError("use add_module() for modules")
        self._raw[key] = value
        if key == "port":
            self._worker_port_free = False
        return self

    def host(self, host: str) -> EngineBuilder:
        """The worker port's address (default ``127.0.0.1``)."""
        return self.set("host", host)

    def port(self, port: int) -> EngineBuilder:
        """The worker port; 0 binds a free port (see :attr:`RunningEngine.ports`)."""
        if port == 0:
            self._raw.pop("port", None)
            self._worker_port_free = True
            return self
        return self.set("port", port)

    def free_ports(self, host: str = "127.0.0.1") -> EngineBuilder:
        """Every listener on ``host``, each on a port the OS picks when it binds:
        the worker port and every module's ``host`` / ``port`` (REST API,
        stream).  Applied after validation, to the modules configured then."""
        self._free_ports = host
        self._worker_port_free = True
        self._raw.pop("port", None)
        self._raw["host"] = host
        return self

    # -- modules and adapters ---------------------------------------------------------------

    def _modules(self, *, defaults: bool) -> list[Any]:
        modules = self._raw.get("modules")
        if modules is None:
            modules = [{"class": name} for name in DEFAULT_MODULES] if defaults else []
            self._raw["modules"] = modules
        elif not isinstance(modules, list):
            raise ValueError(f"the config's modules is not a list: {type(modules).__name__}")
        return modules

    def add_module(self, class_name: str, config: dict[str, Any] | None = None) -> EngineBuilder:
        """List a module (``modules::api::RestApiModule``) with its config block.

        As in a file, a config that lists modules runs those (plus the
        mandatory ones); one that lists none runs the default set.  See
        :meth:`default_modules`.
        """
        entry: dict[str, Any] = {"class": class_name}
        if config is not None:
            entry["config"] = copy.deepcopy(config)
        self._modules(defaults=False).append(entry)
        return self

    def default_modules(self) -> EngineBuilder:
        """List every default module not listed yet (with its default config)."""
        modules = self._modules(defaults=True)
        listed = {entry.get("class") for entry in modules if isinstance(entry, dict)}
        modules.extend({"class": name} for name in DEFAULT_MODULES if name not in listed)
        return self

    def adapter(
        self, module_class: str, adapter_class: str, config: dict[str, Any] | None = None
    ) -> EngineBuilder:
        """Set a module's ``adapter`` block (``modules::state::adapters::RedisAdapter``).

        A module not listed yet is added; with no module listed yet, the
        default set is listed first, so only this module's adapter changes.
        """
        modules = self._modules(defaults=True)
        block = {"class": adapter_class, "config": copy.deepcopy(config) if config else {}}
        for entry in modules:
            if isinstance(entry, dict) and entry.get("class") == module_class:
                module_config = entry.setdefault("config", {})
                if module_config is None:
                    module_config = entry["config"] = {}
                if not isinstance(module_config, dict):
                    raise ValueError(f"the config of {module_class} is not a mapping")
                module_config["adapter"] = block
                return self
        modules.append({"class": module_class, "config": {"adapter": block}})
        return self

    # -- native functions and trigger types -------------------------------------------------

    def function(
        self,
        function_id: str,
        handler: FunctionHandler,
        *,
        description: str | None = None,
        request_format: Any = None,
        response_format: Any = None,
        metadata: Any = None,
    ) -> EngineBuilder:
        """Register a native function (see :data:`FunctionHandler`).

        It is listed by ``engine::functions::list`` and callable by workers
        (under their token's ``invoke`` patterns), triggers and
        :meth:`RunningEngine.call`.  A worker cannot take its id over.
        """
        if not function_id:
            raise ValueError("a function id must not be empty")
        if function_id in self._functions:
            raise ValueError(f"native function {function_id!r} is registered twice")
        self._functions[function_id] = NativeFunction(
            function_id=function_id,
            handler=handler,
            description=description,
            request_format=request_format,
            response_format=response_format,
            metadata=metadata,
        )
        return self

    def trigger_type(
        self, type_id: str, handler: TriggerTypeHandler, *, description: str = ""
    ) -> EngineBuilder:
        """Provide a native trigger type: workers' ``registertrigger`` /
        ``unregistertrigger`` of this type reach ``handler``."""
        if not type_id:
            raise ValueError("a trigger type id must not be empty")
        if type_id in self._trigger_types:
            raise ValueError(f"native trigger type {type_id!r} is registered twice")
        self._trigger_types[type_id] = NativeType(
            type_id=type_id, handler=handler, description=description
        )
        return self

    # -- building and running -----------------------------------------------------------------

    def build_config(self) -> EngineConfig:
        """The validated config, exactly as ``iii serve`` would run it."""
        config = parse_config(copy.deepcopy(self._raw), file=self._file, env=self._env)
        if self._worker_port_free:
            config = attrs.evolve(config, port=0)
        if self._free_ports is not None:
            config = attrs.evolve(
                config,
                modules=tuple(_on_free_port(entry, self._free_ports) for entry in config.modules),
            )
        return config

    def _before_listen(self, engine: Engine) -> None:
        for function in self._functions.values():
            register_native_function(engine, function)
        for trigger_type in self._trigger_types.values():
            register_native_trigger_type(engine, trigger_type)

    async def serve(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[RunningEngine] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the engine until :meth:`RunningEngine.shutdown` (or SIGTERM/SIGINT
        with ``handle_signals``, main thread only); ``nursery.start`` gives the
        :class:`RunningEngine` once the engine serves."""
        await self._serve(self.build_config(), handle_signals, task_status)

    async def _serve(
        self,
        config: EngineConfig,
        handle_signals: bool,
        task_status: trio.TaskStatus[RunningEngine],
    ) -> None:
        await serve_engine(
            config,
            handle_signals=handle_signals,
            before_listen=self._before_listen,
            task_status=StartedAsRunning(config, task_status),
        )

    @asynccontextmanager
    async def open(self, *, handle_signals: bool = False) -> AsyncIterator[RunningEngine]:
        """Run the engine for the duration of the block (see the module docstring).

        A config error is raised here, as a :class:`~iii.errors.ConfigError`,
        before anything runs."""
        config = self.build_config()
        async with trio.open_nursery() as nursery:
            running: RunningEngine = await nursery.start(self._serve, config, handle_signals)
            try:
                yield running
            finally:
                running.shutdown()

    def run_in_thread(self, *, start_timeout: float = 60.0) -> EngineThread:
        """The engine in a thread of its own, for synchronous code: a context
        manager yielding an :class:`~iii.embedding.thread.EngineThread`."""
        return EngineThread(self, start_timeout=start_timeout)


def _on_free_port(entry: ModuleEntry, host: str) -> ModuleEntry:
    config = entry.config
    if not attrs.has(type(config)):
        return entry
    names = {field.name for field in attrs.fields(type(config))}
    if "port" not in names:
        return entry
    changes: dict[str, Any] = {"port": 0}
    if "host" in names:
        changes["host"] = host
    return attrs.evolve(entry, config=attrs.evolve(config, **changes))
