"""Native functions and trigger types: what a program hands the engine it embeds.

A native function is an async ``handler(data, ctx)`` registered as an engine
function (:meth:`iii.engine.Engine.register_function`); a native trigger type
is a :class:`TriggerTypeHandler` behind the registry's trigger-type handler.
Both are registered by :class:`~iii.embedding.builder.EngineBuilder` after
the modules start and before the worker port opens, or later through
:class:`~iii.embedding.running.RunningEngine`.

Lifetime: plain values and adapters; they live as long as the engine's
registry holds them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from iii.errors import IIIError, InvocationFailedError
from iii.native import CallContext
from iii.registry import LogicalTrigger, RegistryError

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = [
    "FunctionHandler",
    "Trigger",
    "TriggerTypeHandler",
    "NativeFunction",
    "NativeType",
    "register_native_function",
    "register_native_trigger_type",
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
class NativeTriggerType:
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
class NativeFunction:
    function_id: str
    handler: FunctionHandler
    description: str | None = None
    request_format: Any = None
    response_format: Any = None
    metadata: Any = None


@attrs.frozen(kw_only=True)
class NativeType:
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


def register_native_function(engine: Engine, spec: NativeFunction) -> None:
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


def register_native_trigger_type(engine: Engine, spec: NativeType) -> None:
    current = engine.registry.trigger_types.get(spec.type_id)
    if current is not None and current.provider is None:
        raise ValueError(f"native trigger type {spec.type_id!r}: the engine already provides it")
    engine.register_trigger_type(
        spec.type_id,
        NativeTriggerType(engine, spec.type_id, spec.handler),
        description=spec.description,
    )
