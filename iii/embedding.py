"""The embedding API: build an engine in a Python program and run it on trio.

An :class:`EngineBuilder` collects a config (a file, a dict, builder calls, or
all three: the calls edit the tree the file or dict gave), native functions
and native trigger types.  Its config goes through
:func:`iii.config.parse_config`, the CLI's validation (an error is a
:class:`~iii.errors.ConfigError` naming the key), and it runs
:func:`iii.engine.serve_engine`, the CLI's engine: there is no second code
path.  Native functions and trigger types are registered after every module
is ready and before the worker port opens, so no worker sees the engine
without them::

    async def add(data: Any, ctx: CallContext) -> Any:
        return {"sum": data["a"] + data["b"]}

    builder = EngineBuilder().free_ports().function("math::add", add)
    async with builder.open() as engine:       # in the caller's task tree
        print(engine.url, engine.ports.rest_api)
        assert await engine.call("math::add", {"a": 1, "b": 2}) == {"sum": 3}

Lifetime: :meth:`EngineBuilder.open` runs the engine in a nursery of its
own, inside the ``async with`` block, and on leaving the block asks for the
CLI's graceful shutdown (in-flight calls get ``shutdown_grace_ms``, workers
are closed with 1012) and waits for it.  :meth:`EngineBuilder.serve` is the
same for ``await nursery.start(builder.serve)``.  A thread of its own, for
synchronous programs and tests, is :mod:`iii.embedding_thread`.

Ports: ``port(0)`` (and :meth:`EngineBuilder.free_ports`) bind port 0, so the
OS picks a free port at bind time (never pick-then-release); the bound ports
are on :attr:`RunningEngine.ports`.  In a file or dict, ``port: 0`` keeps its
upstream meaning (the default port 49134).
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from iii.config import EngineConfig, ModuleEntry, parse_config, read_config_tree
from iii.errors import IIIError, InvocationFailedError
from iii.native import CallContext
from iii.registry import LogicalTrigger, RegistryError, TriggerRegistration

if TYPE_CHECKING:
    from iii.embedding_thread import EngineThread
    from iii.engine import Engine

__all__ = [
    "EngineBuilder",
    "RunningEngine",
    "EnginePorts",
    "FunctionHandler",
    "Trigger",
    "TriggerTypeHandler",
]

log = logging.getLogger(__name__)

FunctionHandler = Callable[[Any, CallContext], Awaitable[Any]]
"""A native function: ``async def handler(data, ctx) -> result``.

``data`` is the call's JSON payload, ``ctx`` a :class:`~iii.native.CallContext`
(the caller's worker id, the invocation id, trace context).  Return a
JSON-serializable result (``None``: no result).  Raise an
:class:`~iii.errors.IIIError` to answer an error with its code; any other
exception answers ``invocation_failed`` with the exception's text (and is
logged with its traceback).
"""


# -- trigger types ---------------------------------------------------------------


@attrs.frozen(eq=False)
class Trigger:
    """A trigger bound to a native trigger type, as its handler sees it.

    The same object is given to ``register_trigger`` and ``unregister_trigger``
    (compare it by identity, or key on :attr:`id`).  :meth:`fire` calls the
    bound function under the grant of the worker that registered the trigger.
    """

    id: str
    trigger_type: str
    function_id: str
    config: Any
    metadata: Any
    _engine: Engine = attrs.field(repr=False)
    _logical: LogicalTrigger = attrs.field(repr=False)

    async def fire(
        self,
        data: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the call's deadline: answers `timeout`
    ) -> Any:
        """Call the bound function with ``data``; returns its result or raises
        :class:`~iii.errors.IIIError` (``forbidden`` when the registrant's token
        may not invoke it, ``function_not_found``, the function's own error,
        ``timeout`` after ``timeout`` seconds, default ``invocation_timeout_ms``).
        A trigger that was unregistered answers ``trigger_not_found``."""
        if not self._logical.active:
            raise IIIError(f"trigger {self.id} is no longer registered", code="trigger_not_found")
        return await self._engine.invoke(
            self.function_id, data, timeout=timeout, grant=self._logical.grant
        )


class TriggerTypeHandler(Protocol):
    """What a native trigger type implements.

    Both calls are synchronous, as the engine's own modules' are: check the
    config and raise an :class:`~iii.errors.IIIError` to refuse it (the worker
    gets its code and message), then start any background work in a nursery
    you own (for instance one around the ``async with builder.open()``).
    """

    def register_trigger(self, trigger: Trigger) -> None: ...

    def unregister_trigger(self, trigger: Trigger) -> None: ...


@attrs.define(eq=False)
class _NativeTriggerType:
    """Adapts a public :class:`TriggerTypeHandler` to the registry's handler."""

    engine: Engine
    type_id: str
    handler: TriggerTypeHandler
    live: dict[LogicalTrigger, Trigger] = attrs.field(factory=dict)

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        public = Trigger(
            id=trigger.id,
            trigger_type=trigger.trigger_type,
            function_id=trigger.function_id,
            config=trigger.config,
            metadata=trigger.metadata,
            engine=self.engine,
            logical=trigger,
        )
        self.handler.register_trigger(public)  # raising refuses it (Engine._activate)
        self.live[trigger] = public

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        public = self.live.pop(trigger, None)
        if public is not None:
            self.handler.unregister_trigger(public)


# -- native functions --------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _NativeFunction:
    function_id: str
    handler: FunctionHandler
    description: str | None = None
    request_format: Any = None
    response_format: Any = None
    metadata: Any = None


@attrs.frozen(kw_only=True)
class _NativeType:
    type_id: str
    handler: TriggerTypeHandler
    description: str = ""


def _contained(function_id: str, handler: FunctionHandler) -> FunctionHandler:
    """The handler, with a non-IIIError exception answered ``invocation_failed``."""

    async def call(data: Any, ctx: CallContext) -> Any:
        try:
            return await handler(data, ctx)
        except IIIError:
            raise
        except Exception as exc:  # the function's own failure: its caller gets it
            log.warning("native function %s raised", function_id, exc_info=True)
            raise InvocationFailedError(str(exc) or type(exc).__name__) from None

    return call


def _register_function(engine: Engine, spec: _NativeFunction) -> None:
    try:
        engine.register_function(
            spec.function_id,
            _contained(spec.function_id, spec.handler),
            description=spec.description,
            request_format=spec.request_format,
            response_format=spec.response_format,
            metadata=spec.metadata,
        )
    except RegistryError as exc:
        raise ValueError(f"native function {spec.function_id!r}: {exc}") from None


def _register_trigger_type(engine: Engine, spec: _NativeType) -> None:
    current = engine.registry.trigger_types.get(spec.type_id)
    if current is not None and current.provider is None:
        raise ValueError(f"native trigger type {spec.type_id!r}: the engine already provides it")
    engine.register_trigger_type(
        spec.type_id,
        _NativeTriggerType(engine, spec.type_id, spec.handler),
        description=spec.description,
    )


# -- the running engine ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EnginePorts:
    """The ports a running engine bound (None: that listener is not running)."""

    worker: int
    rest_api: int | None = None
    stream: int | None = None
    metrics: int | None = None

    @classmethod
    def of(cls, engine: Engine) -> EnginePorts:
        assert engine.listen_port is not None
        rest = engine.modules.get("rest_api")
        stream = engine.modules.get("stream")
        observability = engine.modules.get("observability")
        return cls(
            worker=engine.listen_port,
            rest_api=rest.port if rest is not None else None,
            stream=stream.server.listen_port if stream is not None else None,
            metrics=observability.prometheus_port if observability is not None else None,
        )


def _connect_host(host: str) -> str:
    """Where a local client reaches a listener bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@attrs.define(eq=False)
class RunningEngine:
    """A serving engine, as :meth:`EngineBuilder.open` yields it.

    Use it from the trio run that started the engine (from another thread:
    :class:`~iii.embedding_thread.EngineThread`).
    """

    config: EngineConfig
    ports: EnginePorts
    _engine: Engine = attrs.field(repr=False)

    @property
    def url(self) -> str:
        """The worker URL (``ws://host:port``) for an SDK's ``III_URL``."""
        scheme = "wss" if self.config.tls.enabled else "ws"
        return f"{scheme}://{_connect_host(self.config.host)}:{self.ports.worker}"

    @property
    def rest_url(self) -> str | None:
        """``http://host:port`` of the REST API module, if it runs."""
        if self.ports.rest_api is None:
            return None
        rest = self._engine.modules["rest_api"]
        scheme = "https" if self.config.tls.enabled else "http"  # the engine's tls: keys
        return f"{scheme}://{_connect_host(rest.config.host)}:{self.ports.rest_api}"

    async def call(
        self,
        function_id: str,
        data: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the call's deadline: answers `timeout`
    ) -> Any:
        """Call any function (native, a module's, a worker's) and return its result.

        Raises :class:`~iii.errors.IIIError` with the wire code a worker would
        get (``function_not_found``, ``timeout``, the function's own error …).
        ``timeout`` defaults to the config's ``invocation_timeout_ms``.  The
        call is the engine's own: no token applies.
        """
        return await self._engine.invoke(function_id, data, timeout=timeout)

    def call_void(self, function_id: str, data: Any = None) -> None:
        """Fire and forget: the call runs in the engine; a failure is logged."""
        self._engine.spawn_detached(
            _invoke_void, self._engine, function_id, data, what=f"call_void {function_id!r}"
        )

    async def wait_for_function(self, function_id: str) -> None:
        """Return once ``function_id`` is registered (by a worker, say).  Bound
        the wait yourself: ``with trio.fail_after(10): await engine.wait_for_function(...)``."""
        engine = self._engine
        while function_id not in engine.registry.functions:
            changed = trio.Event()
            engine.function_listeners.append(changed.set)
            try:
                await changed.wait()
            finally:
                engine.function_listeners.remove(changed.set)

    def register_function(
        self,
        function_id: str,
        handler: FunctionHandler,
        *,
        description: str | None = None,
        request_format: Any = None,
        response_format: Any = None,
        metadata: Any = None,
    ) -> None:
        """Add a native function now; ``ValueError`` if the id is taken."""
        _register_function(
            self._engine,
            _NativeFunction(
                function_id=function_id,
                handler=handler,
                description=description,
                request_format=request_format,
                response_format=response_format,
                metadata=metadata,
            ),
        )

    def unregister_function(self, function_id: str) -> None:
        """Remove a native function (a worker's is left alone)."""
        self._engine.unregister_function(function_id)

    def register_trigger_type(
        self, type_id: str, handler: TriggerTypeHandler, *, description: str = ""
    ) -> None:
        """Provide a trigger type now: triggers workers registered for it
        before are handed to ``handler``.  ``ValueError`` if the engine provides it."""
        _register_trigger_type(
            self._engine, _NativeType(type_id=type_id, handler=handler, description=description)
        )

    def register_trigger(
        self, trigger_type: str, function_id: str, config: Any = None, *, metadata: Any = None
    ) -> str:
        """Bind ``function_id`` to a trigger (an HTTP route, a cron schedule …)
        from the program itself; returns the trigger id.  Raises
        :class:`~iii.errors.IIIError` if the trigger type refused the config."""
        trigger_id = str(uuid.uuid4())
        error = self._engine.register_trigger(
            TriggerRegistration(
                worker_id=None,
                id=trigger_id,
                trigger_type=trigger_type,
                function_id=function_id,
                config=config,
                metadata=metadata,
            )
        )
        if error is not None:
            raise IIIError(error.message, code=error.code)
        return trigger_id

    def unregister_trigger(self, trigger_id: str) -> None:
        self._engine.unregister_trigger(None, trigger_id)

    def shutdown(self) -> None:
        """Ask for the graceful shutdown now (leaving the block does it too)."""
        self._engine.request_shutdown()


async def _invoke_void(engine: Engine, function_id: str, data: Any) -> None:
    await engine.invoke_logged(function_id, data, what="call_void")


# -- the builder ---------------------------------------------------------------------


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
        self._functions: dict[str, _NativeFunction] = {}
        self._trigger_types: dict[str, _NativeType] = {}

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
            from iii.modules import DEFAULT_MODULES

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
        from iii.modules import DEFAULT_MODULES

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
        self._functions[function_id] = _NativeFunction(
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
        self._trigger_types[type_id] = _NativeType(
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
            _register_function(engine, function)
        for trigger_type in self._trigger_types.values():
            _register_trigger_type(engine, trigger_type)

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
        from iii.engine import serve_engine

        await serve_engine(
            config,
            handle_signals=handle_signals,
            before_listen=self._before_listen,
            task_status=_Started(config, task_status),
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
        manager yielding an :class:`~iii.embedding_thread.EngineThread`."""
        from iii.embedding_thread import EngineThread

        return EngineThread(self, start_timeout=start_timeout)


@attrs.define(eq=False)
class _Started(trio.TaskStatus["Engine"]):
    """Hands the caller of :meth:`EngineBuilder.serve` a :class:`RunningEngine`
    when :func:`~iii.engine.serve_engine` reports the engine started."""

    config: EngineConfig
    outer: trio.TaskStatus[RunningEngine]

    def started(self, value: Engine | None = None) -> None:
        assert value is not None
        self.outer.started(
            RunningEngine(config=self.config, ports=EnginePorts.of(value), engine=value)
        )


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
