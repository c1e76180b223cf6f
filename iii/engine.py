"""The engine: its shared state (registries, connections, pending calls), the
hooks modules install, and the entry point of every call.

* Registration: functions, trigger types and triggers (``register_*``), and
  forgetting a worker's entries when it leaves.
* Hooks that modules install (:meth:`Engine.using_tracer`,
  :meth:`Engine.listening`, ...): context managers that undo themselves.
* Calls: :meth:`Engine.invoke` checks the grant and wraps the call in its
  span, then the one routing path (:mod:`iii.routing`) runs it;
  :meth:`Engine.track_call` counts the calls an intake handles.

Its lifetime (the supervision tree and the shutdown order) is
:func:`iii.serve.serve_engine`'s.

Routing a call (:meth:`Engine.invoke`): look the function up; an engine
function runs in-process; a worker function goes to the replica with the
fewest pending calls (in a cluster a peer engine's replica counts one more,
so an idle local one wins; a call a peer forwarded runs on local replicas
only), with its pending record filed *before* the
``invokefunction`` is sent; the caller's ``invocation_id`` is used on both
hops; an engine-side deadline (``invocation_timeout_ms``, default 30 s)
answers ``timeout``.

Tracing is one wrapper around that one path (:func:`iii.routing.route`).  Both
kinds of call get the same deadline (``timeout`` or
``invocation_timeout_ms``) through one mechanism: it is filed in the pending
table's deadline heap, and the one expiry task ends the call with
``timeout`` (an engine function runs in the caller's task, so the expiry
cancels its cancel scope; a worker's call only waits for its answer, so the
expiry resolves it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii import routing
from iii.admission import Admission, ConnectionLimits
from iii.causation import TraceDepths
from iii.channels import ChannelTable
from iii.containment import start_contained
from iii.errors import (
    IIIError,
    TriggerRegistrationError,
)
from iii.grants import Grant, TriggerAccess
from iii.inbound import InboundBudget
from iii.invocations import PendingTable
from iii.native import NativeHandler
from iii.protocol import (
    ErrorBody,
    RegisterTrigger,
    UnregisterTrigger,
    encode_message,
)
from iii.registry import (
    FunctionRegistration,
    LogicalTrigger,
    Registry,
    RegistryError,
    TriggerRegistration,
    TriggerType,
    TriggerTypeHandler,
)
from iii.security import Authenticator
from iii.telemetry import TelemetryConsumer, TelemetrySink
from iii.tracing import NOOP_TRACER, EngineTracer, Span

if TYPE_CHECKING:
    from iii.cluster import Cluster
    from iii.config_schema import EngineConfig
    from iii.worker_conn import WorkerConnection

__all__ = ["Engine", "WorkerEvent"]

log = logging.getLogger(__name__)

WorkerEvent = Callable[[str, str], None]  # (event, worker_id)


@attrs.define(eq=False)
class Engine:
    config: EngineConfig
    registry: Registry = attrs.field(factory=Registry)
    # Tells the registry each worker's pending count: replicas are picked by it.
    pending: PendingTable = attrs.field(
        default=attrs.Factory(
            lambda self: PendingTable(on_load=self.registry.set_pending), takes_self=True
        )
    )
    channels: ChannelTable = attrs.field(
        default=attrs.Factory(lambda self: ChannelTable.from_config(self.config), takes_self=True)
    )
    telemetry: TelemetrySink = attrs.field(factory=TelemetrySink)
    # Spans for invocations and module work (iii.tracing); the observability
    # module replaces the no-op default.
    tracer: EngineTracer = NOOP_TRACER
    connections: dict[str, WorkerConnection] = attrs.field(factory=dict)
    modules: dict[str, Any] = attrs.field(factory=dict)
    # Listeners for worker connect / disconnect / metadata events, and for
    # changes of the function set (the worker module turns them into triggers).
    worker_listeners: list[WorkerEvent] = attrs.field(factory=list)
    function_listeners: list[Callable[[], None]] = attrs.field(factory=list)
    # Told whenever a trigger registration is added or removed (the cluster's catalog).
    trigger_listeners: list[Callable[[], None]] = attrs.field(factory=list)
    # Set while this engine is part of a cluster (iii.cluster): peers' functions
    # are replicas owned by one pseudo worker per peer engine.
    cluster: Cluster | None = None
    # Installed by the http_functions module: builds the engine-side handler
    # for a ``registerfunction`` that carries an ``invocation`` block.
    external_function_factory: Callable[[str, Any], NativeHandler] | None = None
    # Installed by modules: function ids that receive other parties' data (the
    # stream auth function, per-stream overrides).  With tokens, a worker may
    # register one only if its grant names it (iii.grants.Grant.names).
    sensitive_functions: list[Callable[[str], bool]] = attrs.field(factory=list)
    # Causation depth of the trace ids of trigger firings (iii.causation).
    trace_depths: TraceDepths = attrs.field(factory=TraceDepths)
    shutting_down: trio.Event = attrs.field(factory=trio.Event)
    ready: trio.Event = attrs.field(factory=trio.Event)
    # Set while serving: where detached (fire-and-forget) calls run.
    connection_nursery: trio.Nursery | None = None
    listen_port: int | None = None
    # Calls being handled for an intake (a worker's call, an HTTP request):
    # counted by track_call(), waited for by the drain.
    inflight: int = 0
    # Who holds a socket on the worker port (max_connections, per address).
    sockets: Admission = attrs.field(
        default=attrs.Factory(
            lambda self: Admission(
                ConnectionLimits(
                    max_connections=self.config.max_connections,
                    max_per_address=self.config.max_connections_per_address,
                )
            ),
            takes_self=True,
        )
    )
    # Bytes of peer messages held on all WebSocket ports (iii.inbound).
    inbound: InboundBudget = attrs.field(
        default=attrs.Factory(
            lambda self: InboundBudget(
                limit=self.config.max_inbound_bytes, slack=self.config.max_message_size
            ),
            takes_self=True,
        )
    )
    authenticator: Authenticator = attrs.field(
        default=attrs.Factory(
            lambda self: Authenticator(
                self.config.auth,
                cluster_token=self.config.cluster.secret if self.config.cluster else None,
            ),
            takes_self=True,
        )
    )
    shutdown_requested: trio.Event = attrs.field(factory=trio.Event)
    # The expiry task's sleep (see expire_invocations); None while it works.
    # Every call's deadline goes through it: an engine not served (no expiry
    # task) times no call out.
    expiry_scope: trio.CancelScope | None = None
    # Set when no call is in flight and none is pending (see wait_idle).
    _idle: trio.Event | None = None

    def __attrs_post_init__(self) -> None:
        self.pending.on_empty = self._check_idle

    @property
    def open_sockets(self) -> int:
        """Sockets open on the worker port: upgraded or in their handshake."""
        return self.sockets.open

    # -- engine functions and trigger types (module API) -------------------

    def register_function(
        self,
        function_id: str,
        handler: NativeHandler,
        *,
        description: str | None = None,
        request_format: Any = None,
        response_format: Any = None,
        metadata: Any = None,
        owner: str | None = None,
    ) -> None:
        """Add an engine-side function.  ``owner`` ties it to a worker's lifetime."""
        created = self.registry.add_function(
            FunctionRegistration(
                function_id=function_id,
                owner=owner,
                description=description,
                request_format=request_format,
                response_format=response_format,
                metadata=metadata,
                handler=handler,
            )
        )
        if created:
            self.notify_functions_changed()

    def is_sensitive(self, function_id: str) -> bool:
        return any(predicate(function_id) for predicate in self.sensitive_functions)

    def unregister_function(self, function_id: str, *, owner: str | None = None) -> None:
        if self.registry.remove_function(owner, function_id):
            self.notify_functions_changed()

    def register_trigger_type(
        self,
        type_id: str,
        handler: TriggerTypeHandler,
        *,
        description: str = "",
        access: TriggerAccess | None = None,
    ) -> None:
        """Provide a trigger type; ``access`` declares what its configs name (iii.grants)."""
        waiting = self.registry.add_trigger_type(
            TriggerType(id=type_id, description=description, handler=handler, access=access)
        )
        for trigger in waiting:
            error = self._activate(trigger)
            if error is not None:
                log.warning(
                    "parked trigger %s refused by %s: %s", trigger.id, type_id, error.message
                )

    # -- triggers ----------------------------------------------------------

    def register_trigger(self, registration: TriggerRegistration) -> ErrorBody | None:
        """File a registration; returns an error body if its trigger type refused it."""
        existing = self.registry.registration(registration.worker_id, registration.id)
        if existing == registration:
            return None  # a replay of what this connection already registered
        if existing is not None:
            self.unregister_trigger(registration.worker_id, registration.id)
        trigger, created = self.registry.add_trigger(registration)
        if not created:
            self.notify_triggers_changed()
            return None  # joins an identical trigger: it already fires
        error = self._activate(trigger)
        if error is not None:
            self.registry.remove_trigger(registration.worker_id, registration.id)
        else:
            self.notify_triggers_changed()
        return error

    def unregister_trigger(self, worker_id: str | None, trigger_id: str) -> None:
        removed = self.registry.remove_trigger(worker_id, trigger_id)
        if removed is not None and removed[1]:
            self._deactivate(removed[0])
        if removed is not None:
            self.notify_triggers_changed()

    def _activate(self, trigger: LogicalTrigger) -> ErrorBody | None:
        trigger_type = self.registry.trigger_types.get(trigger.trigger_type)
        if trigger_type is None:
            log.warning(
                "trigger %s waits for trigger type %r, which nobody provides yet",
                trigger.id,
                trigger.trigger_type,
            )
            return None
        if trigger_type.handler is not None:
            try:
                trigger_type.handler.register_trigger(trigger)
            except IIIError as exc:
                return ErrorBody(code=exc.code, message=exc.message)
            except Exception as exc:
                log.exception(
                    "trigger type %s failed to register %s", trigger.trigger_type, trigger.id
                )
                return ErrorBody(code=TriggerRegistrationError.code, message=str(exc))
            trigger.active = True
            return None
        provider = self.connections.get(trigger_type.provider or "")
        if provider is not None:
            provider.send_nowait(
                encode_message(
                    RegisterTrigger(
                        id=trigger.id,
                        trigger_type=trigger.trigger_type,
                        function_id=trigger.function_id,
                        config=trigger.config,
                        metadata=trigger.metadata,
                    )
                )
            )
            trigger.active = True
        return None

    def _deactivate(self, trigger: LogicalTrigger) -> None:
        if not trigger.active:
            return
        trigger.active = False
        trigger_type = self.registry.trigger_types.get(trigger.trigger_type)
        if trigger_type is None:
            return
        if trigger_type.handler is not None:
            try:
                trigger_type.handler.unregister_trigger(trigger)
            except Exception:
                log.exception(
                    "trigger type %s failed to unregister %s", trigger.trigger_type, trigger.id
                )
            return
        provider = self.connections.get(trigger_type.provider or "")
        if provider is not None:
            provider.send_nowait(
                encode_message(UnregisterTrigger(id=trigger.id, trigger_type=trigger.trigger_type))
            )

    def add_worker_trigger_type(self, provider: str, trigger_type: TriggerType) -> None:
        try:
            waiting = self.registry.add_trigger_type(trigger_type)
        except RegistryError as exc:
            log.warning("worker %s: %s", provider, exc)
            return
        for trigger in waiting:
            self._activate(trigger)

    # -- workers -------------------------------------------------------------

    def notify_worker(self, event: str, worker_id: str) -> None:
        for listener in self.worker_listeners:
            try:
                listener(event, worker_id)
            except Exception:
                log.exception("worker listener failed on %s", event)

    def notify_triggers_changed(self) -> None:
        for listener in self.trigger_listeners:
            try:
                listener()
            except Exception:
                log.exception("trigger listener failed")

    def notify_functions_changed(self) -> None:
        for listener in self.function_listeners:
            try:
                listener()
            except Exception:
                log.exception("function listener failed")

    def forget_worker(self, worker_id: str) -> None:
        """Remove everything a gone worker owned (spec protocol.md §3.1 step 4).

        Synchronous, so it runs to completion even while the connection's
        scope is being cancelled.
        """
        self.connections.pop(worker_id, None)
        for invocation in self.pending.stop_target(worker_id):
            log.debug(
                "invocation %s of %s stopped: worker %s left",
                invocation.invocation_id,
                invocation.function_id,
                worker_id,
            )
        self.channels.remove_owned_by(worker_id)
        if self.drop_worker_entries(worker_id):
            self.notify_worker("worker_disconnected", worker_id)

    def drop_worker_entries(self, worker_id: str) -> bool:
        """Remove a worker's functions, triggers and trigger types from the
        registry (and deactivate its triggers); False if it had none filed."""
        removal = self.registry.remove_worker(worker_id)
        if removal is None:
            return False
        for trigger in removal.triggers_gone:
            self._deactivate(trigger)
        if removal.functions_gone:
            self.notify_functions_changed()
        if removal.worker.trigger_ids or removal.triggers_gone:
            self.notify_triggers_changed()
        return True

    # -- hooks that modules install ---------------------------------------------
    # Each returns a context manager: the hook is in place for the block and
    # undone when it ends, whatever ends it (a module stopping or failing).

    @contextmanager
    def using_tracer(self, tracer: EngineTracer) -> Iterator[None]:
        """Spans for invocations and module work come from ``tracer``."""
        previous, self.tracer = self.tracer, tracer
        try:
            yield
        finally:
            if self.tracer is tracer:
                self.tracer = previous

    @contextmanager
    def using_telemetry_consumer(self, consumer: TelemetryConsumer) -> Iterator[None]:
        """SDK telemetry frames (``OTLP``/``MTRC``/``LOGS``) go to ``consumer``."""
        previous, self.telemetry.consumer = self.telemetry.consumer, consumer
        try:
            yield
        finally:
            if self.telemetry.consumer is consumer:
                self.telemetry.consumer = previous

    @contextmanager
    def using_external_function_factory(
        self, factory: Callable[[str, Any], NativeHandler]
    ) -> Iterator[None]:
        """A ``registerfunction`` with an ``invocation`` block is built by ``factory``."""
        previous, self.external_function_factory = self.external_function_factory, factory
        try:
            yield
        finally:
            if self.external_function_factory is factory:
                self.external_function_factory = previous

    @contextmanager
    def listening(
        self,
        *,
        workers: WorkerEvent | None = None,
        functions: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        """Call ``workers(event, worker_id)`` on worker events and ``functions()``
        when the function set changes, for the block."""
        if workers is not None:
            self.worker_listeners.append(workers)
        if functions is not None:
            self.function_listeners.append(functions)
        try:
            yield
        finally:
            if workers is not None:
                self.worker_listeners.remove(workers)
            if functions is not None:
                self.function_listeners.remove(functions)

    @contextmanager
    def marking_sensitive(self, receives_others_data: Callable[[str], bool]) -> Iterator[None]:
        """Function ids for which ``receives_others_data`` is true need a grant
        that names them to be registered (see :meth:`is_sensitive`)."""
        self.sensitive_functions.append(receives_others_data)
        try:
            yield
        finally:
            self.sensitive_functions.remove(receives_others_data)

    # -- invocation ------------------------------------------------------------

    async def invoke(
        self,
        function_id: str,
        data: Any,
        *,
        caller_worker_id: str | None = None,
        invocation_id: str | None = None,
        traceparent: str | None = None,
        baggage: str | None = None,
        metadata: Any = None,
        timeout: float | None = None,
        on_span: Callable[[Span], None] | None = None,
        reply_limit: int | None = None,
        grant: Grant | None = None,
        grant_checked: bool = False,
    ) -> Any:
        """Run a function wherever it lives and return its result.

        Raises an :class:`IIIError`: ``forbidden``, ``function_not_found``, the
        function's own error, ``invocation_stopped`` (the worker left),
        ``timeout``.

        ``grant`` is the token of whoever the call is made for (the calling
        worker, a trigger's registrants, a job's enqueuer); None when the
        engine calls for itself.  It is checked here, and an engine function
        receives it as ``ctx.grant`` and passes it on to the calls it makes
        for its caller: one check for direct and nested calls alike.
        ``grant_checked``: the caller checked what it named itself and the
        engine names ``function_id`` (the ``enqueue`` action calls
        ``engine::queue::enqueue`` for a worker that named the job's function).

        With a tracer installed the call runs under an invocation span (child
        of ``traceparent``), and the function receives that span's context;
        ``on_span`` is then given that span as soon as it opens (so a caller
        can answer with its context).  Without a tracer it is never called.
        ``reply_limit`` is the caller's frame limit when the result goes back
        to a worker (see :class:`~iii.native.CallContext`).
        """
        if grant is not None and not grant_checked:
            grant.require_invoke(function_id)
        route = partial(
            routing.route,
            self,
            function_id,
            data,
            caller_worker_id=caller_worker_id,
            invocation_id=invocation_id,
            metadata=metadata,
            timeout=timeout,
            reply_limit=reply_limit,
            grant=grant,
        )
        if not self.tracer.enabled:
            return await route(traceparent=traceparent, baggage=baggage, span=None)
        # Tracing is one wrapper around the one routing path.
        with self.tracer.invocation(
            function_id,
            traceparent=traceparent,
            baggage=baggage,
            caller_worker_id=caller_worker_id,
            invocation_id=invocation_id,
        ) as span:
            if on_span is not None:
                on_span(span)
            return await route(traceparent=span.traceparent, baggage=span.baggage, span=span)

    @contextmanager
    def track_call(self) -> Iterator[None]:
        """Count a call an intake handles (a worker's ``invokefunction``, an HTTP
        request) for as long as the block runs: shutdown waits for it, within
        ``shutdown_grace_ms``.  Every intake path uses this, so none can be
        forgotten by the drain."""
        self.inflight += 1
        try:
            yield
        finally:
            self.end_call()

    def begin_call(self) -> None:
        """:meth:`track_call` for a call no task runs (iii.cluster.relay): call
        :meth:`end_call` once it ends."""
        self.inflight += 1

    def end_call(self) -> None:
        self.inflight -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        if self._idle is not None and not self.inflight and not len(self.pending):
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call is in flight and none is pending (no polling)."""
        while self.inflight or len(self.pending):
            self._idle = trio.Event()
            await self._idle.wait()

    async def expire_invocations(self) -> None:
        """The expiry task of every call (:func:`iii.routing.expire_invocations`)."""
        await routing.expire_invocations(self)

    async def invoke_logged(self, function_id: str, data: Any, *, what: str, **kwargs: Any) -> Any:
        """``invoke`` for trigger sources: an error is logged and returned as None."""
        try:
            return await self.invoke(function_id, data, **kwargs)
        except IIIError as exc:
            log.warning("%s -> %s failed: %s: %s", what, function_id, exc.code, exc.message)
            return None

    def spawn_detached(
        self, fn: Callable[..., Any], *args: Any, what: str = "detached task"
    ) -> None:
        """Run ``fn(*args)`` in the engine-owned connection nursery, contained:
        an exception ends that task only (logged with ``what``)."""
        if self.connection_nursery is None:
            raise RuntimeError("the engine is not serving")
        start_contained(self.connection_nursery, what, fn, *args)

    # -- lifetime -------------------------------------------------------------------

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()
