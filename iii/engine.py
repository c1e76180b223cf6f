"""The engine: its shared state, invocation routing, and THE supervision tree.

Supervision tree (copied into README.rst)::

    trio.run
    └── serve_engine                      engine nursery
        ├── signal watcher                SIGTERM/SIGINT -> graceful shutdown
        ├── invocation expiry             answers ``timeout`` for routed calls past
        │                                 their deadline (one heap, not a scope per call)
        └── module nursery                one task per module (``await start(module.run)``,
            │                             in config order); each module owns its adapter
            │                             and its own nursery; modules exit last
            ├── <module>.run ...
            │   └── EngineLink.run        bridge_client (and Bridge adapters): the link to a
            │       │                     remote engine; connect, reattach, re-register;
            │       │                     on a drop, fail calls in flight, back off, reconnect
            │       └── link connection   per-connection nursery: reader, writer, heartbeat,
            │                             calls from the remote (bounded, each with a deadline)
            └── connection nursery        owned by the engine
                ├── WS listener           port 49134: "/", "/otel", "/ws/channels/{id}";
                │                         counts sockets on accept (iii.admission)
                ├── socket (iii.wsserver) one per accepted socket, supervised: the library's
                │   │                     WS reader and the handler below, in its own nursery
                │   └── WorkerConnection.run  one per worker, with a per-connection nursery:
                │       ├── reader        decodes and dispatches, never awaits a call inline
                │       ├── writer        drains a bounded send queue (backpressure)
                │       ├── heartbeat     WS ping; no pong in time -> connection dropped
                │       └── invocation tasks  one per request/response call the worker
                │                         made, each under its own deadline
                │   (or a channel side, or an /otel socket)
                ├── detached calls        fire-and-forget calls: owned by the engine, not
                │                         by the caller, so a caller that leaves right after
                │                         sending (``trigger_void`` then exit) loses nothing
                └── cluster (iii.cluster) with a ``cluster:`` section: Redis membership and
                                          one supervised link per peer engine (see there)

A disconnect cancels exactly that worker's nursery: its reader, writer and the
calls it was waiting on.  Calls routed *to* it end ``invocation_stopped``.  A
link (:mod:`iii.link`) that drops cancels its own connection's nursery only;
its calls in flight end ``invocation_stopped`` and it reconnects.  A
module that crashes raises through the module nursery and stops the engine
(one-for-all; systemd restarts it).  Nothing else is one-for-all: a failure in
one socket's subtree, one call task, one detached call or one event a module
dispatches is logged with its id and ends that one only (:mod:`iii.wsserver`,
:mod:`iii.containment`).

Shutdown order (SIGTERM/SIGINT or :meth:`Engine.request_shutdown`):

1. stop intake: the listener closes, ``engine.shutting_down`` is set (modules
   stop their trigger sources: cron ticks, queue pulls);
2. in-flight calls get ``shutdown_grace`` seconds to finish;
3. workers are closed with 1012 (service restart), not 1000/1001, so both
   SDK generations reconnect to the next engine (spec protocol.md §1);
4. in a cluster, the engine leaves the membership (peers drop it at once);
   the connection nursery is cancelled, then modules exit (and close their
   adapters); ``serve_engine`` returns.

A program that embeds the engine (:mod:`iii.embedding`) runs this same
:func:`serve_engine` in its own task tree; its native functions and trigger
types are registered through ``before_listen``, after the modules and before
the listener.

Routing a call (:meth:`Engine.invoke`): look the function up; an engine
function runs in-process; a worker function goes to the replica with the
fewest pending calls (in a cluster a peer engine's replica counts one more,
so an idle local one wins; a call a peer forwarded runs on local replicas
only), with its pending record filed *before* the
``invokefunction`` is sent; the caller's ``invocation_id`` is used on both
hops; an engine-side deadline (``invocation_timeout_ms``, default 30 s)
answers ``timeout``.

Tracing is one wrapper around that one path (:meth:`Engine._route`).  Both
kinds of call get the same deadline (``timeout`` or
``invocation_timeout_ms``); an engine function runs in the caller's task, so
a cancel scope stops it, while a worker's call only waits for its answer,
which the pending table's deadline heap resolves with ``timeout`` (one
expiry task for all calls, instead of a cancel scope per routed call).
"""

from __future__ import annotations

import logging
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from iii.admission import Admission, ConnectionLimits
from iii.causation import TraceDepths
from iii.channels import ChannelTable
from iii.containment import start_contained
from iii.errors import (
    FunctionNotFoundError,
    IIIError,
    InvocationFailedError,
    InvocationTimeoutError,
    TriggerRegistrationError,
)
from iii.grants import Grant, TriggerAccess
from iii.inbound import InboundBudget
from iii.invocations import TIMED_OUT, DuplicateInvocationError, Invocation, PendingTable
from iii.listener import serve_listener
from iii.modules import build_modules, module_class_name
from iii.native import CallContext, NativeHandler
from iii.protocol import (
    ErrorBody,
    InvokeFunction,
    RegisterTrigger,
    UnregisterTrigger,
    encode_message,
)
from iii.registry import (
    FunctionEntry,
    FunctionRegistration,
    LogicalTrigger,
    Registry,
    RegistryError,
    TriggerRegistration,
    TriggerType,
    TriggerTypeHandler,
)
from iii.security import Authenticator
from iii.services import ServiceRefusedError, module_service
from iii.telemetry import TelemetryConsumer, TelemetrySink
from iii.tracing import NOOP_TRACER, EngineTracer, Span

if TYPE_CHECKING:
    from iii.cluster import Cluster
    from iii.config_schema import EngineConfig
    from iii.worker_conn import WorkerConnection

__all__ = ["Engine", "serve_engine", "WorkerEvent"]

log = logging.getLogger(__name__)

WorkerEvent = Callable[[str, str], None]  # (event, worker_id)
# How late a routed call may time out at most (see Engine.expire_invocations).
EXPIRY_RESOLUTION = 0.05


@attrs.define(eq=False)
class Engine:
    config: EngineConfig
    registry: Registry = attrs.field(factory=Registry)
    # Tells the registry each worker's pending count: replicas are picked by it.
    pending: PendingTable = attrs.field(
        default=attrs.Factory(
            lambda self: PendingTable(on_load=self.registry.set_load), takes_self=True
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
    _shutdown_requested: trio.Event = attrs.field(factory=trio.Event)
    # The expiry task's sleep (see expire_invocations); None while it works.
    _expiry_scope: trio.CancelScope | None = None
    # Set when no call is in flight and none is pending (see _wait_idle).
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
                log.warning("parked trigger %s refused by %s: %s", trigger.id, type_id, error.message)

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
                log.exception("trigger type %s failed to register %s", trigger.trigger_type, trigger.id)
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
                log.exception("trigger type %s failed to unregister %s", trigger.trigger_type, trigger.id)
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
            self._route,
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

    async def _route(
        self,
        function_id: str,
        data: Any,
        *,
        caller_worker_id: str | None,
        invocation_id: str | None,
        traceparent: str | None,
        baggage: str | None,
        metadata: Any,
        timeout: float | None,
        reply_limit: int | None,
        grant: Grant | None,
        span: Span | None,
    ) -> Any:
        """The one routing path (module docstring, "Routing a call"): an engine
        function runs in this task under its deadline; a worker's call is filed
        in the pending table, whose deadline heap answers ``timeout``."""
        entry = self.registry.functions.get(function_id)
        if entry is None:
            raise FunctionNotFoundError(function_id)
        if timeout is None:
            timeout = self.config.invocation_timeout
        replica = self._pick_replica(entry, local_only=grant is not None and grant.cluster_peer)
        if invocation_id is None:
            invocation_id = str(uuid.uuid4())
        if span is not None:
            span.set_attribute("iii.worker.id", replica.owner or "engine")
        if replica.handler is not None:
            ctx = CallContext(
                function_id=function_id,
                caller_worker_id=caller_worker_id,
                invocation_id=invocation_id,
                traceparent=traceparent,
                baggage=baggage,
                metadata=metadata,
                reply_limit=reply_limit,
                grant=grant,
            )
            with trio.move_on_after(timeout):
                return await replica.handler(data, ctx)
            raise InvocationTimeoutError(f"Invocation of {function_id} timed out after {timeout:g}s")
        assert replica.owner is not None
        target = self.connections.get(replica.owner)
        if target is None:  # registry and connections disagree only during teardown
            raise FunctionNotFoundError(function_id)
        deadline = trio.current_time() + timeout
        invocation = Invocation(
            invocation_id=invocation_id,
            function_id=function_id,
            target_worker_id=replica.owner,
            caller_worker_id=caller_worker_id,
            deadline=deadline,
        )
        try:
            self.pending.add(invocation)
        except DuplicateInvocationError:
            raise IIIError(
                f"invocation id {invocation_id} is already in use", code="invocation_error"
            ) from None
        expiry = self._expiry_scope
        if expiry is not None and deadline < expiry.deadline:
            expiry.deadline = deadline  # the expiry task wakes for this one
        try:
            try:
                frame = encode_message(
                    InvokeFunction(
                        function_id=function_id,
                        data=data,
                        invocation_id=invocation_id,
                        traceparent=traceparent,
                        baggage=baggage,
                        metadata=metadata,
                    )
                )
            except orjson.JSONEncodeError as exc:  # a value no peer could have sent
                raise IIIError(
                    f"the data for {function_id} cannot be sent as JSON: {exc}",
                    code="serialization_error",
                ) from None
            # Both waits are bounded: the send by the worker's slow-consumer
            # timeout, the answer by the deadline (expire_invocations).
            await target.send(frame)
            await invocation.done.wait()
        finally:
            self.pending.discard(invocation)
        error = invocation.error
        if error is TIMED_OUT:
            raise InvocationTimeoutError(f"Invocation of {function_id} timed out after {timeout:g}s")
        if error is not None:
            raise InvocationFailedError(error.message, code=error.code, stacktrace=error.stacktrace)
        return invocation.result

    def _pick_replica(self, entry: FunctionEntry, *, local_only: bool) -> FunctionRegistration:
        """The replica to run a call on: the least loaded, where a peer
        engine's replica counts one more than its calls in flight (so an idle
        local replica is preferred).  A call a peer engine forwarded
        (``local_only``) runs on this engine's own replicas only."""
        cluster = self.cluster
        if cluster is None:
            return entry.pick()  # O(1): the registry keeps replicas in pick order
        if local_only:
            local = [r for r in entry.replicas.values() if not cluster.is_remote(r.owner)]
            if not local:
                raise FunctionNotFoundError(entry.function_id)
            return entry.pick_by(self.pending.executing_on, among=local)

        def load(owner: str) -> int:
            if cluster.is_remote(owner):
                return cluster.load(owner) + 1
            return self.pending.executing_on(owner)

        return entry.pick_by(load)

    async def expire_invocations(self) -> None:
        """Resolve routed calls whose deadline has passed with ``timeout``.

        Runs in the engine nursery while serving.  It sleeps until the
        earliest deadline in the pending table (``invoke`` moves the wake-up
        earlier when it files an earlier one) and, so that a stream of calls
        does not wake it once per call, at most once per
        ``EXPIRY_RESOLUTION`` seconds: a call times out up to that much late.
        """
        while True:
            with trio.CancelScope(deadline=self.pending.next_deadline) as scope:
                self._expiry_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._expiry_scope = None
            for invocation in self.pending.expire(trio.current_time()):
                log.debug("%s (%s) timed out", invocation.function_id, invocation.invocation_id)
            await trio.sleep(EXPIRY_RESOLUTION)

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
            self.inflight -= 1
            self._check_idle()

    def _check_idle(self) -> None:
        if self._idle is not None and not self.inflight and not len(self.pending):
            self._idle.set()

    async def _wait_idle(self) -> None:
        """Return once no call is in flight and none is pending (no polling)."""
        while self.inflight or len(self.pending):
            self._idle = trio.Event()
            await self._idle.wait()

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
        self._shutdown_requested.set()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.request_shutdown()
                return

    async def _drain(self, listener_scope: trio.CancelScope) -> None:
        """Shutdown steps 1–3 (see the module docstring)."""
        listener_scope.cancel()
        self.shutting_down.set()
        with trio.move_on_after(self.config.shutdown_grace):
            await self._wait_idle()
        if self.inflight or len(self.pending):
            log.warning(
                "shutdown grace over with %d calls in flight; they are cancelled",
                self.inflight + len(self.pending),
            )
        with trio.move_on_after(2):
            async with trio.open_nursery() as closing:
                for connection in list(self.connections.values()):
                    closing.start_soon(connection.close_for_restart)


async def serve_engine(
    config: EngineConfig,
    *,
    handle_signals: bool = True,
    engine: Engine | None = None,
    before_listen: Callable[[Engine], None] | None = None,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the engine until shutdown is requested; see the module docstring.

    ``before_listen`` is called once every module is ready and before the
    worker port opens (the embedding API registers its native functions and
    trigger types there, so no worker sees the engine without them); an
    exception it raises stops the engine before it serves.
    """
    if engine is None:
        engine = Engine(config)
    async with trio.open_nursery() as engine_nursery:
        engine_nursery.start_soon(engine.expire_invocations)
        if handle_signals:
            engine_nursery.start_soon(engine._watch_signals)
        async with trio.open_nursery() as module_nursery:
            for name, module in build_modules(engine, config):
                engine.modules[name] = module
                before = set(engine.registry.functions)
                await module_nursery.start(module.run)
                service = module_service(
                    name,
                    set(engine.registry.functions) - before,
                    class_name=module_class_name(name),
                )
                if service is not None:
                    try:
                        engine.registry.add_service(service)
                    except ServiceRefusedError as exc:  # listing only: not worth a crash
                        log.warning("module %s: its service is not listed: %s", name, exc)
                log.debug("module %s ready", name)
            if before_listen is not None:
                before_listen(engine)
            async with trio.open_nursery() as connection_nursery:
                engine.connection_nursery = connection_nursery
                listener_scope = trio.CancelScope()
                server = await connection_nursery.start(serve_listener, engine, listener_scope)
                engine.listen_port = server.port
                log.info(
                    "iii engine listening on %s://%s:%d (%d modules%s)",
                    "wss" if config.tls.enabled else "ws",
                    config.host,
                    engine.listen_port,
                    len(engine.modules),
                    ", worker auth on" if engine.authenticator.enabled else "",
                )
                if config.cluster is not None:
                    from iii.cluster import serve_cluster

                    await connection_nursery.start(serve_cluster, engine)
                engine.ready.set()
                task_status.started(engine)
                await engine._shutdown_requested.wait()
                await engine._drain(listener_scope)
                if engine.cluster is not None:
                    await engine.cluster.leave()  # while Redis is still open
                connection_nursery.cancel_scope.cancel()
            engine.connection_nursery = None
            module_nursery.cancel_scope.cancel()
            engine_nursery.cancel_scope.cancel()
    log.info("iii engine stopped")
