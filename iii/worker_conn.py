"""One worker's WebSocket connection: handshake, reader, heartbeat; its writer is a FrameWriter.

Lifetime: :meth:`WorkerConnection.run` is started by the listener in the
engine's connection nursery and returns when the socket ends, the worker
misses a heartbeat, falls too far behind (slow consumer), is replaced by a
``reattach``, or the engine shuts down.  Everything the worker registered is
then removed (:meth:`Engine.forget_worker`) and every call it was waiting on
is cancelled with it, because those calls run in its per-connection nursery.

The engine speaks first (``workerregistered``), then the reader dispatches
each frame in order.  Registrations are applied inline (they are synchronous
table updates), and each ``invokefunction`` becomes its own task
(:mod:`iii.worker_calls`), so a slow call never holds up pings, results or
other calls.

With ``auth.tokens`` configured, the connection carries its token's
:class:`~iii.security.Grant`: a registration outside it is refused
(``registrationrejected`` code ``FORBIDDEN`` for a function, a
``triggerregistrationresult`` error ``forbidden`` for a trigger: its type,
function, the functions its config names, or data the token may not read;
see :mod:`iii.grants`) and a call outside it is answered ``forbidden``.  A
function that receives other parties' data (``Engine.is_sensitive``) must be
named by the token's ``register`` list, and a service ``X`` is filed only if
the token may register ``X::...`` (:mod:`iii.services`).  A worker may have at most
``max_pending_invocations`` calls outstanding; more are answered
``too_many_pending_invocations`` (fire-and-forget ones are dropped, logged).

Frames to 0.4.1 workers are capped at 1 MiB (its ``websockets`` client closes
on anything larger, spec protocol.md §1); a worker that reports the
``large-messages.v1`` feature, or a non-Python runtime, gets the full limit.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.containment import start_contained
from iii.errors import FrameTooLargeError, IIIError, MessageDecodeError
from iii.frame_writer import CloseReason, DropCause, FrameWriter
from iii.invocations import STOPPED, Invocation
from iii.log import RateLimitedLog, bounded_repr
from iii.protocol import (
    TELEMETRY_PREFIXES,
    CloseCode,
    ErrorBody,
    InvocationResult,
    InvokeFunction,
    Ping,
    Pong,
    Reattach,
    RegisterFunction,
    RegisterService,
    RegisterTrigger,
    RegisterTriggerType,
    RegistrationRejected,
    TriggerRegistrationResult,
    UnregisterFunction,
    UnregisterTrigger,
    UnregisterTriggerType,
    WorkerRegistered,
    decode_message,
    encode_message,
)
from iii.registry import (
    FunctionRegistration,
    RegistryError,
    TriggerRegistration,
    TriggerType,
    WorkerInfo,
)
from iii.security import ALLOW_ALL, Grant
from iii.services import ServiceRefusedError, ServiceRegistration
from iii.worker_calls import start_call
from iii.wsio import receive_frames

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["WorkerConnection", "LEGACY_FRAME_LIMIT"]

log = logging.getLogger(__name__)

LEGACY_FRAME_LIMIT = 1024 * 1024
SHUTDOWN = CloseReason(DropCause.SHUTDOWN)
PONG = encode_message(Pong())


@attrs.define(eq=False)
class WorkerConnection:
    engine: Engine
    ws: WebSocketConnection
    ip_address: str = ""
    worker_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    reattach_token: str = attrs.field(
        factory=lambda: str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))
    )
    grant: Grant = ALLOW_ALL
    close_reason: CloseReason | None = None
    # Calls this worker made that are not answered yet (max_pending_invocations).
    calls_outstanding: int = 0
    # Its calls relayed to a peer engine (iii.cluster.relay), by their
    # invocation in the pending table: stopped when this worker leaves.
    relayed: set[Invocation] = attrs.field(factory=set)
    # Set once a refusal for max_pending_invocations was logged (iii.worker_calls).
    over_limit_logged: bool = False
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    # Every frame to this worker goes through it (its invariants: iii/frame_writer.py).
    _frames: FrameWriter = attrs.field(init=False)
    _nursery: trio.Nursery | None = None
    # Warnings about what this worker sent (malformed frames, bad telemetry,
    # refused registrations and calls): the first few, then one per interval,
    # so a hostile worker cannot flood the log.
    bad_input_log: RateLimitedLog = attrs.field(init=False, factory=lambda: RateLimitedLog(log))

    def __attrs_post_init__(self) -> None:
        self._frames = FrameWriter(
            self.ws,
            queue_size=self.engine.config.send_queue_size,
            write_timeout=self.engine.config.slow_consumer_timeout,
            on_drop=self._on_drop,
            frame_limit=LEGACY_FRAME_LIMIT,
        )

    @property
    def frame_limit(self) -> int:
        """The largest frame this worker takes: 1 MiB until it reports it takes more."""
        return self._frames.frame_limit

    # -- sending -------------------------------------------------------------

    async def send(self, frame: str) -> None:
        """Send a frame (written at once when nothing is ahead of it, else queued).

        Raises :class:`FrameTooLargeError` over this worker's frame limit; a
        worker that does not read is dropped as a slow consumer.
        """
        await self._frames.send(frame)

    def send_nowait(self, frame: str) -> None:
        """Queue a frame from synchronous code; a full queue drops the worker.

        A frame over this worker's limit is dropped with a warning.
        """
        try:
            self._frames.send_nowait(frame)
        except FrameTooLargeError as exc:
            self.bad_input_log.warning("worker %s: frame dropped: %s", self.worker_id, exc.message)

    def offer_nowait(self, frame: str) -> bool:
        """Queue a frame from synchronous code; False (nothing queued) when the
        queue is full.  Raises :class:`FrameTooLargeError` over the frame limit."""
        return self._frames.offer_nowait(frame)

    def _on_drop(self, reason: CloseReason | None) -> None:
        if reason is None:
            self._scope.cancel()  # the socket closed under a write
        else:
            self.abort(reason)

    def start_task(self, fn: Callable[..., Any], *args: Any, what: str = "task") -> None:
        """Run ``fn(*args)`` in this connection's nursery: it ends with the connection.

        Contained: an exception in it ends that task only (logged with ``what``).
        """
        assert self._nursery is not None
        start_contained(self._nursery, what, fn, *args)

    def abort(self, reason: CloseReason) -> None:
        """End the connection at once; :meth:`run` cleans up."""
        if self.close_reason is None:
            self.close_reason = reason
            log.warning("worker %s dropped: %s", self.worker_id, reason)
        self._scope.cancel()

    async def close_for_restart(self) -> None:
        """Engine shutdown: close with 1012 so every SDK reconnects later."""
        self.close_reason = self.close_reason or SHUTDOWN
        self._frames.close()  # a write blocked on a peer that reads nothing ends now
        with trio.move_on_after(1):
            await self.ws.aclose(CloseCode.SERVICE_RESTART, "engine restarting")
        self._scope.cancel()

    # -- lifetime ------------------------------------------------------------

    async def run(self) -> None:
        engine = self.engine
        info = WorkerInfo(id=self.worker_id, ip_address=self.ip_address, connected_at_ms=_now_ms())
        hello = encode_message(
            WorkerRegistered(worker_id=self.worker_id, reattach_token=self.reattach_token)
        )
        with trio.move_on_after(engine.config.handshake_timeout) as hello_scope:
            try:
                await self.ws.send_message(hello)
            except ConnectionClosed:
                return
        if hello_scope.cancelled_caught:
            log.info("worker socket from %s never took workerregistered: dropped", self.ip_address)
            return
        engine.registry.add_worker(info)
        engine.connections[self.worker_id] = self
        engine.notify_worker("worker_connected", self.worker_id)
        try:
            with self._scope:
                async with trio.open_nursery() as connection_nursery:
                    self._nursery = connection_nursery
                    connection_nursery.start_soon(self._frames.run)
                    connection_nursery.start_soon(self._heartbeat)
                    await self._reader()
                    connection_nursery.cancel_scope.cancel()
        finally:
            self._frames.close()
            for invocation in list(self.relayed):
                invocation.resolve(error=STOPPED)  # (its answer has nowhere to go)
            engine.forget_worker(self.worker_id)
            self.bad_input_log.report_held("worker %s", self.worker_id)
            log.info(
                "worker %s (%s) disconnected: %s",
                self.worker_id,
                info.name or "unnamed",
                str(self.close_reason or _describe_close(self.ws)),
            )
            if self._scope.cancelled_caught and self.close_reason != SHUTDOWN:
                # Aborted: drop the TCP connection without a close handshake.
                with trio.CancelScope() as abort_scope:
                    abort_scope.cancel()
                    await self.ws.aclose(CloseCode.POLICY, str(self.close_reason or "")[:120])

    async def _heartbeat(self) -> None:
        interval = self.engine.config.heartbeat_interval
        timeout = self.engine.config.heartbeat_timeout
        if interval <= 0 or math.isinf(interval):
            return
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(timeout) as scope:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                self.abort(CloseReason(DropCause.NO_PONG, f"within {timeout:g}s"))
                return

    async def _reader(self) -> None:
        while True:
            try:
                frames = await receive_frames(self.ws)
            except ConnectionClosed:
                return
            for frame in frames:
                self._handle_frame(frame)

    def _handle_frame(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            if frame[:4] in TELEMETRY_PREFIXES:
                self.engine.telemetry.ingest(frame, self.worker_id, self.bad_input_log)
                return
        elif not frame.strip():
            return
        try:
            message = decode_message(frame)
        except MessageDecodeError as exc:
            self._on_bad_frame(exc, frame)
            return
        self._dispatch(message)

    # -- dispatch ------------------------------------------------------------------

    def _on_bad_frame(self, exc: MessageDecodeError, frame: str | bytes) -> None:
        # exc.reason quotes at most a snippet of the frame (iii.protocol).
        self.bad_input_log.warning(
            "worker %s sent a malformed message of length %d (dropped): %s",
            self.worker_id,
            len(frame),
            exc.reason,
            extra={"worker_id": self.worker_id, "invocation_id": exc.invocation_id},
        )
        if exc.invocation_id is None:
            return
        error = ErrorBody(code="deserialization_error", message=f"Malformed message: {exc.reason}")
        if exc.message_type == "invocationresult":
            # The answer to a call could not be read: fail that call now.
            self.engine.pending.resolve_from(self.worker_id, exc.invocation_id, error=error)
        elif exc.message_type == "invokefunction" or exc.message_type is None:
            self.send_nowait(
                encode_message(
                    InvocationResult(
                        invocation_id=exc.invocation_id,
                        function_id=exc.function_id or "",
                        error=error,
                    )
                )
            )

    def _dispatch(self, message: Any) -> None:
        engine = self.engine
        kind = type(message)
        if kind is InvokeFunction:
            start_call(self, message)
        elif kind is InvocationResult:
            engine.pending.resolve_from(
                self.worker_id, message.invocation_id, result=message.result, error=message.error
            )
        elif kind is Ping:
            self.send_nowait(PONG)
        elif kind is RegisterFunction:
            self._register_function(message)
        elif kind is UnregisterFunction:
            engine.unregister_function(message.id, owner=self.worker_id)
        elif kind is RegisterTrigger:
            self._register_trigger(message)
        elif kind is UnregisterTrigger:
            engine.unregister_trigger(self.worker_id, message.id)
        elif kind is RegisterTriggerType:
            if not self.grant.may_use_trigger_type(message.id):
                self.bad_input_log.warning(
                    "worker %s (token %s) may not provide trigger type %r: ignored",
                    self.worker_id,
                    self.grant.name,
                    message.id,
                )
                return
            engine.add_worker_trigger_type(
                self.worker_id,
                TriggerType(
                    id=message.id,
                    description=message.description,
                    provider=self.worker_id,
                    trigger_request_format=message.trigger_request_format,
                    call_request_format=message.call_request_format,
                ),
            )
        elif kind is UnregisterTriggerType:
            engine.registry.remove_trigger_type(message.id, provider=self.worker_id)
        elif kind is TriggerRegistrationResult:
            self._on_trigger_result(message)
        elif kind is Reattach:
            self._reattach(message)
        elif kind is RegisterService:
            self._register_service(message)
        # Pong, WorkerRegistered, RegistrationRejected from a worker: nothing to do.

    def _register_function(self, message: RegisterFunction) -> None:
        engine = self.engine
        if not self.grant.may_register(message.id):
            self.bad_input_log.warning(
                "worker %s (token %s) may not register function %r: refused",
                self.worker_id,
                self.grant.name,
                message.id,
            )
            self._reject_function(message.id, "FORBIDDEN")
            return
        if engine.is_sensitive(message.id) and not self.grant.names(message.id):
            log.warning(
                "worker %s (token %s) may not register %r: it receives other parties' data, "
                "and the token's register list does not name it (the bare '*' does not count)",
                self.worker_id,
                self.grant.name,
                message.id,
            )
            self._reject_function(message.id, "FORBIDDEN")
            return
        if message.invocation is not None:
            factory = engine.external_function_factory
            if factory is None:
                self.bad_input_log.log(
                    logging.ERROR,
                    "worker %s registered HTTP-invoked function %r, but the http_functions "
                    "module is not enabled: ignored",
                    self.worker_id,
                    message.id,
                )
                self._reject_function(message.id, "HTTP_FUNCTIONS_DISABLED")
                return
            try:
                handler = factory(message.id, message.invocation)
            except IIIError as exc:
                self.bad_input_log.log(
                    logging.ERROR,
                    "worker %s: HTTP function %r refused: %s",
                    self.worker_id,
                    message.id,
                    exc,
                )
                self._reject_function(message.id, exc.code)
                return
        else:
            handler = None
        try:
            created = engine.registry.add_function(
                FunctionRegistration(
                    function_id=message.id,
                    owner=self.worker_id,
                    description=message.description,
                    request_format=message.request_format,
                    response_format=message.response_format,
                    metadata=message.metadata,
                    handler=handler,
                )
            )
        except RegistryError as exc:
            self.bad_input_log.warning(
                "worker %s: function %r refused: %s", self.worker_id, message.id, exc
            )
            self._reject_function(message.id, "FUNCTION_NAMESPACE_CONFLICT")
            return
        if created:
            engine.notify_functions_changed()

    def _register_service(self, message: RegisterService) -> None:
        # registerservice has no answer (upstream sends none): a refused one
        # is logged, rate-limited, and changes nothing.  With tokens, a service
        # groups functions the token may register: "billing::*" allows
        # "billing" and "billing::refunds" (iii.services).
        try:
            if not self.grant.may_register(f"{message.id}::"):
                raise ServiceRefusedError(f"token {self.grant.name} may not register its functions")
            self.engine.registry.add_service(ServiceRegistration.of(message, self.worker_id))
        except ServiceRefusedError as exc:
            self.bad_input_log.warning(
                "worker %s: service %s refused: %s", self.worker_id, bounded_repr(message.id), exc
            )

    def _reject_function(self, function_id: str, code: str) -> None:
        self.send_nowait(
            encode_message(
                RegistrationRejected(code=code, function_id=function_id, owner_worker_id="")
            )
        )

    def _register_trigger(self, message: RegisterTrigger) -> None:
        error: ErrorBody | None
        trigger_type = self.engine.registry.trigger_types.get(message.trigger_type)
        refusal = self.grant.binding_refusal(
            message.trigger_type,
            message.function_id,
            message.config,
            trigger_type.access if trigger_type is not None else None,
        )
        if refusal is not None:
            error = ErrorBody(code="forbidden", message=refusal)
        else:
            error = self._file_trigger(message)
        if error is not None:
            self.bad_input_log.warning(
                "worker %s: trigger %r (%r -> %r) refused: %s",
                self.worker_id,
                message.id,
                message.trigger_type,
                message.function_id,
                error.message,
            )
            self.send_nowait(
                encode_message(
                    TriggerRegistrationResult(
                        id=message.id,
                        trigger_type=message.trigger_type,
                        function_id=message.function_id,
                        error=error,
                    )
                )
            )

    def _file_trigger(self, message: RegisterTrigger) -> ErrorBody | None:
        return self.engine.register_trigger(
            TriggerRegistration(
                worker_id=self.worker_id,
                id=message.id,
                trigger_type=message.trigger_type,
                function_id=message.function_id,
                config=message.config,
                metadata=message.metadata,
                grant=self.grant,
            )
        )

    def _on_trigger_result(self, message: TriggerRegistrationResult) -> None:
        if message.error is None:
            return
        trigger_type = self.engine.registry.trigger_types.get(message.trigger_type)
        if trigger_type is None or trigger_type.provider != self.worker_id:
            return  # only the provider of the type may answer for it
        self.bad_input_log.warning(
            "provider %s refused trigger %r: %r",
            self.worker_id,
            message.id,
            message.error.message,
        )
        for trigger in self.engine.registry.triggers_of_type(message.trigger_type):
            if trigger.id != message.id:
                continue
            for worker_id, trigger_id in trigger.registrants:
                registrant = self.engine.connections.get(worker_id or "")
                if registrant is not None:
                    registrant.send_nowait(
                        encode_message(
                            TriggerRegistrationResult(
                                id=trigger_id,
                                trigger_type=message.trigger_type,
                                function_id=message.function_id,
                                error=message.error,
                            )
                        )
                    )

    def _reattach(self, message: Reattach) -> None:
        previous = self.engine.connections.get(message.previous_worker_id)
        if previous is None or previous is self:
            return
        if message.reattach_token is None or not secrets.compare_digest(
            message.reattach_token, previous.reattach_token
        ):
            self.bad_input_log.log(
                logging.INFO,
                "worker %s: reattach to %s without a valid token ignored",
                self.worker_id,
                previous.worker_id,
            )
            return
        previous.abort(CloseReason(DropCause.REPLACED, self.worker_id))

    # -- metadata (engine::workers::register) ------------------------------------------

    def apply_metadata(self, metadata: dict[str, Any]) -> None:
        info = self.engine.registry.workers.get(self.worker_id)
        if info is None:
            return
        for field in ("name", "runtime", "version", "os", "description", "namespace"):
            value = metadata.get(field)
            if isinstance(value, str):
                setattr(info, field, value)
        pid = metadata.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool):
            info.pid = pid
        info.telemetry = metadata.get("telemetry", info.telemetry)
        info.isolation = metadata.get("isolation", info.isolation)
        features = metadata.get("features")
        if isinstance(features, list):
            info.features = tuple(f for f in features if isinstance(f, str))
        if "large-messages.v1" in info.features or (info.runtime not in (None, "python")):
            self._frames.frame_limit = self.engine.config.max_message_size


def _now_ms() -> int:
    return int(time.time() * 1000)


def _describe_close(ws: WebSocketConnection) -> str:
    reason = ws.closed
    if reason is None:
        return "connection ended"
    return f"close code {reason.code}" + (f" ({reason.reason})" if reason.reason else "")
