"""The engine link: one supervised connection from this engine to another, as its worker.

An :class:`EngineLink` is how this engine uses a remote iii engine (the
BridgeClient module, the Bridge adapters).  It connects to the remote's
worker port as a worker does, speaks the worker protocol through
:mod:`iii.protocol`'s codec, and connects through :func:`iii.client.open_session`
(TCP, TLS with the system store or ``ca_file``, the upgrade with
``Authorization: Bearer``, ``workerregistered``, ``engine::workers::register``
with the link's ``name``).

Public shape::

    config = LinkConfig(url="ws://backend:49134", name="iii-bridge-client", token=None)
    link = EngineLink(config)
    await nursery.start(link.run)          # started at once; the link may still be down
    link.expose("remote::id", handler)      # handler(data, TraceContext) -> result
    link.register_service("svc", name="svc")
    link.register_trigger("t1", "queue", "remote::id", {"topic": "x"})
    await link.call("state::get", data, timeout_s=5.0, trace=TraceContext(traceparent=...))
    await link.call_void("log::info", data)

Behaviour:

* :meth:`EngineLink.run` is the supervised loop; it lives in its owner's
  nursery and runs until cancelled.  It connects (bounded by
  ``connect_timeout_s``), sends ``reattach`` when the remote gave a reattach
  token on the previous connection (the remote then drops that connection
  if it is still there), re-sends every service, exposed function and
  trigger (in that order), and only then counts as :attr:`connected`.  When
  the connection ends it fails the calls in flight with
  ``invocation_stopped``, waits a jittered, capped exponential backoff
  (``backoff_initial_s`` doubling up to ``backoff_max_s``; reset after a
  connection that got as far as registering) and connects again.
* :meth:`EngineLink.call` raises at once an :class:`~iii.errors.IIIError`
  with code ``bridge_unavailable`` (or the ``unavailable_code`` the caller
  gives, e.g. ``adapter_unavailable``) while the link is down;
  ``invocation_stopped`` when the link drops while the call is in flight;
  ``timeout`` after ``timeout_s``; ``payload_too_large`` when the call does
  not fit in ``max_message_size``; the remote's error as an IIIError with
  the remote's code, message and stacktrace.  :meth:`call_void` is
  fire-and-forget (no ``invocation_id``): nothing comes back, and it too
  fails at once while the link is down.
* Calls the remote makes to an exposed function run in the connection's
  nursery (at most ``max_concurrent_calls`` at once: more are answered
  ``too_many_pending_invocations``; each bounded by ``handler_timeout_s``),
  and the answer or the error with its code goes back.  A call of a
  function not exposed is answered ``function_not_found``.  A drop cancels
  them with the connection.
* :class:`TraceContext` carries ``traceparent`` / ``baggage`` both ways: on
  the calls the link makes, and into the exposed handlers.

The remote is a hostile peer.  Its frames are capped at ``max_message_size``
(a larger one closes the connection with 1009, and the link reconnects),
undecodable frames are skipped (one that names a call in flight fails that
call with ``deserialization_error``), strings it sends are escaped before
they reach a log, registration refusals are logged (rate-limited), every
send is bounded by ``send_timeout_s`` and a WebSocket ping must be answered
within ``heartbeat_timeout_s`` (else the connection is dropped).

The package: this module holds :class:`EngineLink` (the supervised loop, the
tables re-sent on every connection, the calls it makes);
:mod:`iii.link.connection` one live connection's tasks; :mod:`iii.link.values`
the value types, re-exported here.

Lifetime: the link owns nothing outside :meth:`run`; one connection at a
time lives in a per-connection nursery inside it (reader, writer, heartbeat
and the exposed calls), and the socket is closed when the connection ends.
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.client import CLOSE_TIMEOUT, ClientError, Endpoint, client_metadata, open_session
from iii.errors import FrameTooLargeError, IIIError, InvocationTimeoutError
from iii.link.connection import OUTBOX_FRAMES, LinkConnection
from iii.link.values import (
    UNAVAILABLE,
    Exposed,
    ExposedHandler,
    LinkConfig,
    LinkStatistics,
    PendingCall,
    TraceContext,
)
from iii.log import RateLimitedLog, clean, describe_error
from iii.protocol import (
    InvokeFunction,
    Message,
    Reattach,
    RegisterFunction,
    RegisterService,
    RegisterTrigger,
    UnregisterFunction,
    UnregisterTrigger,
    encode_message,
)

__all__ = [
    "LinkConfig",
    "TraceContext",
    "ExposedHandler",
    "LinkStatistics",
    "EngineLink",
    "UNAVAILABLE",
]

log = logging.getLogger(__name__)


class _LinkDown(ClientError):
    """The connection ended; the message says why (safe to log)."""


@attrs.define(eq=False)
class EngineLink:
    """A supervised connection to a remote engine; see the module docstring."""

    config: LinkConfig
    # Drawn from for the backoff jitter (a test may pass a seeded one).
    rng: random.Random = attrs.field(factory=random.Random)
    _endpoint: Endpoint = attrs.field(init=False)
    _exposed: dict[str, Exposed] = attrs.field(init=False, factory=dict)
    _services: dict[str, RegisterService] = attrs.field(init=False, factory=dict)
    _triggers: dict[str, RegisterTrigger] = attrs.field(init=False, factory=dict)
    _connection: LinkConnection | None = attrs.field(init=False, default=None)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)
    _previous: Reattach | None = attrs.field(init=False, default=None)
    _connections: int = attrs.field(init=False, default=0)
    _failed_attempts: int = attrs.field(init=False, default=0)
    _last_error: str | None = attrs.field(init=False, default=None)
    _attempt_ready: bool = attrs.field(init=False, default=False)
    _metadata: dict[str, Any] = attrs.field(init=False, factory=dict)
    _bad_input_log: RateLimitedLog = attrs.field(init=False, factory=lambda: RateLimitedLog(log))
    # A remote that stays down: the first failures, then one line a minute.
    _attempt_log: RateLimitedLog = attrs.field(
        init=False, factory=lambda: RateLimitedLog(log, burst=3, interval=60.0)
    )

    def __attrs_post_init__(self) -> None:
        self._endpoint = self.config.endpoint()
        self._metadata = client_metadata(self.config.name, self.config.description)

    # -- state --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True once connected and everything is registered on the remote."""
        return self._connection is not None and self._connection.ready

    @property
    def url(self) -> str:
        return self.config.url

    def statistics(self) -> LinkStatistics:
        connection = self._connection
        return LinkStatistics(
            connected=self.connected,
            connections=self._connections,
            failed_attempts=self._failed_attempts,
            calls_in_flight=len(connection.pending) if connection is not None else 0,
            exposed_calls_running=connection.running if connection is not None else 0,
            last_error=self._last_error,
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_for(self, want: Callable[[], bool], timeout_s: float) -> bool:
        with trio.move_on_after(timeout_s):
            while not want():
                await self._changed.wait()
            return True
        return False

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until :attr:`connected`; False if ``timeout_s`` passed first."""
        return await self._wait_for(lambda: self.connected, timeout_s)

    async def wait_disconnected(self, timeout_s: float) -> bool:
        """Wait until the link is down; False if ``timeout_s`` passed first."""
        return await self._wait_for(lambda: not self.connected, timeout_s)

    async def wait_failed_attempts(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` connection attempts have failed in all (for tests and startup)."""
        return await self._wait_for(lambda: self._failed_attempts >= count, timeout_s)

    # -- what is registered on the remote (re-sent after every reconnect) ------------------

    def expose(
        self,
        remote_function_id: str,
        handler: ExposedHandler,
        *,
        description: str | None = None,
        request_format: Any = None,
        response_format: Any = None,
        metadata: Any = None,
    ) -> None:
        """Register ``remote_function_id`` on the remote, served by ``handler``."""
        registration = RegisterFunction(
            id=remote_function_id,
            description=description,
            request_format=request_format,
            response_format=response_format,
            metadata=metadata,
        )
        self._exposed[remote_function_id] = Exposed(handler, registration)
        self._send_registration(registration)

    def unexpose(self, remote_function_id: str) -> None:
        if self._exposed.pop(remote_function_id, None) is not None:
            self._send_registration(UnregisterFunction(id=remote_function_id))

    def register_service(
        self,
        service_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        parent_service_id: str | None = None,
    ) -> None:
        """Register a service on the remote (``registerservice``; name defaults to the id)."""
        message = RegisterService(
            id=service_id,
            name=name or service_id,
            description=description,
            parent_service_id=parent_service_id,
        )
        self._services[service_id] = message
        self._send_registration(message)

    def register_trigger(
        self,
        trigger_id: str,
        trigger_type: str,
        function_id: str,
        config: Any = None,
        *,
        metadata: Any = None,
    ) -> None:
        """Bind a remote trigger (of the remote's ``trigger_type``) to ``function_id``.

        ``function_id`` is usually one this link exposes.  A refusal by the
        remote is logged.
        """
        message = RegisterTrigger(
            id=trigger_id,
            trigger_type=trigger_type,
            function_id=function_id,
            config=config,
            metadata=metadata,
        )
        self._triggers[trigger_id] = message
        self._send_registration(message)

    def unregister_trigger(self, trigger_id: str) -> None:
        message = self._triggers.pop(trigger_id, None)
        if message is not None:
            self._send_registration(
                UnregisterTrigger(id=trigger_id, trigger_type=message.trigger_type)
            )

    def _send_registration(self, message: Message) -> None:
        connection = self._connection
        if connection is not None:
            connection.send_nowait(encode_message(message))
        # No connection: the next one sends the tables when it gets there.

    # -- calls to the remote -------------------------------------------------------------

    def _unavailable(self, code: str) -> IIIError:
        why = f" ({self._last_error})" if self._last_error else ""
        return IIIError(f"the link to {self.config.url} is down{why}", code=code)

    def _encode(self, message: InvokeFunction) -> str:
        try:
            frame = encode_message(message)
        except (orjson.JSONEncodeError, TypeError) as exc:
            raise IIIError(
                f"the data for {message.function_id} cannot be sent as JSON: {exc}",
                code="serialization_error",
            ) from None
        limit = self.config.max_message_size
        # A character takes at most 4 bytes: most frames are cleared by their length.
        if len(frame) > limit or (len(frame) * 4 > limit and len(frame.encode()) > limit):
            raise FrameTooLargeError(
                f"the call of {message.function_id} is larger than the link's"
                f" max_message_size ({self.config.max_message_size} bytes)"
            )
        return frame

    async def call(
        self,
        function_id: str,
        data: Any,
        *,
        timeout_s: float | None,
        trace: TraceContext | None = None,
        unavailable_code: str = UNAVAILABLE,
    ) -> Any:
        """Call ``function_id`` on the remote and return its result (see the module docstring).

        ``timeout_s=None``: the caller bounds the call itself (a deadline of
        its own, as ``Engine.invoke`` sets for every function); the link adds
        none, which saves a cancel scope per call.
        """
        connection = self._connection
        if connection is None or not connection.ready:
            raise self._unavailable(unavailable_code)
        invocation_id = str(uuid.uuid4())
        frame = self._encode(
            InvokeFunction(
                function_id=function_id,
                data=data,
                invocation_id=invocation_id,
                traceparent=trace.traceparent if trace else None,
                baggage=trace.baggage if trace else None,
            )
        )
        pending = PendingCall(function_id)
        connection.pending[invocation_id] = pending
        try:
            # A connection that ends meanwhile fails the call (LinkConnection.close).
            if timeout_s is None:
                await connection.send(frame)
                await pending.done.wait()
            else:
                with trio.move_on_after(timeout_s):
                    await connection.send(frame)
                    await pending.done.wait()
        finally:
            connection.pending.pop(invocation_id, None)
        if not pending.done.is_set():
            assert timeout_s is not None
            raise InvocationTimeoutError(
                f"Invocation of {function_id} on {self.config.url} timed out after {timeout_s:g}s"
            )
        if pending.error is not None:
            raise pending.error
        return pending.result

    def start_call_nowait(
        self,
        invocation_id: str,
        function_id: str,
        data: Any,
        *,
        trace: TraceContext | None,
        on_finish: Callable[[PendingCall], None],
    ) -> bool:
        """Send a call without waiting for anything: ``on_finish`` gets its
        :class:`PendingCall` once the answer (or the link's drop) is there.

        False (nothing sent) when the link is down, its queue is full, or the
        call cannot be encoded or sent whole: the caller then uses
        :meth:`call`, which says why.  No deadline: the caller keeps one, and
        :meth:`forget_call` when it gives up (a late answer is then ignored).
        """
        connection = self._connection
        if connection is None or not connection.ready:
            return False
        try:
            frame = self._encode(
                InvokeFunction(
                    function_id=function_id,
                    data=data,
                    invocation_id=invocation_id,
                    traceparent=trace.traceparent if trace else None,
                    baggage=trace.baggage if trace else None,
                )
            )
        except IIIError:
            return False
        if invocation_id in connection.pending or not connection.offer_nowait(frame):
            return False
        connection.pending[invocation_id] = PendingCall(function_id, on_finish=on_finish)
        return True

    def forget_call(self, invocation_id: str) -> None:
        """Stop waiting for the answer to a call of :meth:`start_call_nowait`."""
        connection = self._connection
        if connection is not None:
            connection.pending.pop(invocation_id, None)

    async def call_void(
        self,
        function_id: str,
        data: Any,
        *,
        trace: TraceContext | None = None,
        unavailable_code: str = UNAVAILABLE,
    ) -> None:
        """Fire and forget: sent (queued for the socket) or an error at once; nothing comes back."""
        connection = self._connection
        if connection is None or not connection.ready:
            raise self._unavailable(unavailable_code)
        frame = self._encode(
            InvokeFunction(
                function_id=function_id,
                data=data,
                traceparent=trace.traceparent if trace else None,
                baggage=trace.baggage if trace else None,
            )
        )
        if not await connection.send(frame):
            raise self._unavailable(unavailable_code)

    def fail_calls(self, error: Callable[[str], IIIError]) -> None:
        """End every call in flight now with ``error(function_id)``."""
        connection = self._connection
        if connection is not None:
            for pending in list(connection.pending.values()):
                pending.finish(error=error(pending.function_id))

    # -- the supervised loop -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, register, serve; reconnect after a drop.  Runs until cancelled."""
        task_status.started()
        attempt = 0
        while True:
            registered = await self._connect_once()
            if registered:
                attempt = 0
            delay = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2.0**attempt)
            attempt = min(attempt + 1, 62)
            # Equal jitter: at least half the delay, so a flapping remote is not hammered.
            delay = delay / 2 + self.rng.uniform(0, delay / 2)
            log.debug("link to %s: reconnecting in %.2fs", self.config.url, delay)
            await trio.sleep(delay)

    async def _connect_once(self) -> bool:
        """One connection, from connecting to its end; True if it got as far as registering."""
        self._attempt_ready = False
        connected = False
        try:
            with trio.CancelScope(
                deadline=trio.current_time() + self.config.connect_timeout_s
            ) as connect_scope:
                async with open_session(
                    self._endpoint,
                    metadata=self._metadata,
                    max_message_size=self.config.max_message_size,
                    close_timeout=min(CLOSE_TIMEOUT, self.config.connect_timeout_s),
                ) as session:
                    connected = True
                    connect_scope.deadline = math.inf
                    await self._serve(session.ws, session.worker_id, session.reattach_token)
            if connect_scope.cancelled_caught and not connected:
                self._ended(f"no answer while connecting within {self.config.connect_timeout_s:g}s")
        except (ClientError, ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
            self._ended(exc.message if isinstance(exc, ClientError) else describe_error(exc))
        except Exception as exc:  # anything else ends this connection only
            log.exception("link to %s: the connection failed unexpectedly", self.config.url)
            self._ended(describe_error(exc))
        return self._attempt_ready

    def _ended(self, reason: str) -> None:
        self._last_error = reason
        if self._attempt_ready:
            log.warning("link to %s: connection lost: %s", self.config.url, clean(reason, 400))
        else:
            self._failed_attempts += 1
            self._attempt_log.warning(
                "link to %s: cannot connect: %s", self.config.url, clean(reason, 400)
            )
        self._notify()

    async def _serve(
        self, ws: WebSocketConnection, worker_id: str, reattach_token: str | None
    ) -> None:
        """Register everything, then serve until the connection ends (:class:`_LinkDown`)."""
        registrations = len(self._services) + len(self._exposed) + len(self._triggers)
        connection: LinkConnection | None = None
        try:
            async with trio.open_nursery() as connection_nursery:
                connection = LinkConnection(
                    ws,
                    connection_nursery,
                    self.config,
                    self._exposed,
                    self._bad_input_log,
                    outbox_frames=OUTBOX_FRAMES + registrations,
                )
                connection.start()
                if self._previous is not None:
                    connection.send_nowait(encode_message(self._previous))
                self._previous = (
                    Reattach(previous_worker_id=worker_id, reattach_token=reattach_token)
                    if reattach_token
                    else None
                )
                for service in self._services.values():
                    connection.send_nowait(encode_message(service))
                for exposed in self._exposed.values():
                    connection.send_nowait(encode_message(exposed.registration))
                for trigger in self._triggers.values():
                    connection.send_nowait(encode_message(trigger))
                # From here on a new registration goes straight to this connection.
                self._connection = connection
                await self._barrier(connection)
                connection.ready = True
                self._attempt_ready = True
                self._connections += 1
                self._last_error = None
                log.info(
                    "link to %s: connected as worker %s (%d functions exposed)",
                    self.config.url,
                    clean(worker_id, 80),
                    len(self._exposed),
                )
                self._notify()
        finally:
            if connection is not None:
                if self._connection is connection:
                    self._connection = None
                connection.close()
                self._notify()
        assert connection is not None
        raise _LinkDown(connection.drop_reason or "the connection ended")

    async def _barrier(self, connection: LinkConnection) -> None:
        """Wait until the remote has applied what was sent so far.

        The remote handles a connection's frames in order, so the answer to
        a call sent after the registrations means they are in place.  The
        call re-sends the link's own metadata: harmless, and any answer
        (an error too) will do.
        """
        invocation_id = str(uuid.uuid4())
        pending = PendingCall("engine::workers::register")
        connection.pending[invocation_id] = pending
        connection.send_nowait(
            encode_message(
                InvokeFunction(
                    function_id="engine::workers::register",
                    data=self._metadata,
                    invocation_id=invocation_id,
                )
            )
        )
        with trio.move_on_after(self.config.connect_timeout_s):
            await pending.done.wait()
        connection.pending.pop(invocation_id, None)
        if not pending.done.is_set():
            connection.abort(
                f"the registrations were not answered within {self.config.connect_timeout_s:g}s"
            )
            await trio.sleep_forever()  # cancelled by the abort
