"""The handle of a serving embedded engine: its bound ports and its in-process API.

:class:`RunningEngine` is what :meth:`EngineBuilder.open
<iii.embedding.builder.EngineBuilder.open>` yields.  It holds the engine
(private) and forwards to it: calls, native registrations, program-made
triggers, the shutdown request.

Lifetime: valid while the engine serves (inside the ``async with`` block or
until ``shutdown``); it owns nothing itself.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.config import EngineConfig
from iii.embedding.native import (
    FunctionHandler,
    NativeFunction,
    NativeType,
    TriggerTypeHandler,
    register_native_function,
    register_native_trigger_type,
)
from iii.errors import IIIError
from iii.registry import TriggerRegistration

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["EnginePorts", "RunningEngine", "StartedAsRunning"]


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
    :class:`~iii.embedding.thread.EngineThread`).
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
            with engine.listening(functions=changed.set):
                await changed.wait()

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
        register_native_function(
            self._engine,
            NativeFunction(
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
        register_native_trigger_type(
            self._engine, NativeType(type_id=type_id, handler=handler, description=description)
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


@attrs.define(eq=False)
class StartedAsRunning(trio.TaskStatus["Engine"]):
    """Hands the caller of :meth:`EngineBuilder.serve` a :class:`RunningEngine`
    when :func:`~iii.engine.serve_engine` reports the engine started."""

    config: EngineConfig
    outer: trio.TaskStatus[RunningEngine]

    def started(self, value: Engine | None = None) -> None:
        assert value is not None
        self.outer.started(
            RunningEngine(config=self.config, ports=EnginePorts.of(value), engine=value)
        )
