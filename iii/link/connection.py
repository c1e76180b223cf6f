"""One live connection of an engine link: reader, writer, heartbeat, and the remote's calls.

:class:`LinkConnection` is made by :class:`iii.link.EngineLink` for each
connection it opens, and runs in a per-connection nursery inside the link's
loop:

* the *writer* is an :class:`iii.frame_writer.FrameWriter`, as for a
  worker's socket: a call made while nothing waits to be written writes its
  frame itself (no handoff to the writer task: one scheduler pass less on the
  forwarded call's path), else the frame is queued and the writer task
  writes every frame queued in one wave in one system call; each write is
  bounded by ``send_timeout_s``, and a queue that stays full that long (or is
  full for a registration) drops the connection;
* the *heartbeat* pings every ``heartbeat_interval_s`` and drops the
  connection when no pong comes within ``heartbeat_timeout_s``;
* the *reader* decodes each frame (undecodable ones are skipped and logged,
  rate-limited; one that answers a call in flight fails that call with
  ``deserialization_error``) and dispatches it without awaiting: answers go
  to the calls in flight, ``invokefunction`` for an exposed function becomes
  its own task (at most ``max_concurrent_calls``, each bounded by
  ``handler_timeout_s``), refusals by the remote are logged.

:meth:`LinkConnection.abort` records why and cancels the nursery: every task
of this connection ends, and the link fails the calls in flight with
``invocation_stopped``.

Lifetime: one connection, from the remote's greeting to the drop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.errors import (
    FrameTooLargeError,
    IIIError,
    InvocationFailedError,
    InvocationStoppedError,
    MessageDecodeError,
)
from iii.frame_writer import CloseReason, FrameWriter
from iii.link.values import Exposed, LinkConfig, PendingCall, TraceContext
from iii.log import RateLimitedLog, clean
from iii.protocol import (
    TELEMETRY_PREFIXES,
    ErrorBody,
    InvocationResult,
    InvokeFunction,
    Message,
    Ping,
    Pong,
    RegistrationRejected,
    TriggerRegistrationResult,
    decode_message,
    encode_message,
)
from iii.wsconnection import GuardedConnection
from iii.wsio import receive_frames

__all__ = ["LinkConnection", "OUTBOX_FRAMES"]

log = logging.getLogger("iii.link")

# Frames waiting for the writer, beyond what the link registers on connect.
# Registrations go in without waiting; a connection whose queue is full is
# stuck, and is dropped.
OUTBOX_FRAMES = 1024
# Answers up to this large are dispatched by the socket's reader task.
DIRECT_ANSWER_MAX = 64 * 1024
_ANSWER_END = '"type":"invocationresult"}'


@attrs.define(eq=False)
class LinkConnection:
    """One connection: its socket, send queue, calls in flight and nursery."""

    ws: WebSocketConnection
    nursery: trio.Nursery
    config: LinkConfig
    # The link's table of exposed functions (shared, not copied: an exposure
    # made while connected is served at once).
    exposed: Mapping[str, Exposed]
    bad_input_log: RateLimitedLog
    outbox_frames: int = OUTBOX_FRAMES
    pending: dict[str, PendingCall] = attrs.field(factory=dict)
    # True once the remote has applied the registrations (see EngineLink._barrier).
    ready: bool = False
    # Calls from the remote running now.
    running: int = 0
    drop_reason: str | None = None
    _frames: FrameWriter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._frames = FrameWriter(
            self.ws,
            queue_size=self.outbox_frames,
            write_timeout=self.config.send_timeout_s,
            on_drop=self._on_drop,
            # The link checks its frames in bytes before they get here
            # (EngineLink._encode, _run_exposed); this is a backstop.
            frame_limit=self.config.max_message_size,
        )

    def start(self) -> None:
        """Start the writer, reader and heartbeat in the connection's nursery.

        On our own WebSocket client (:class:`~iii.wsconnection.GuardedConnection`)
        the answers to calls in flight are dispatched by the socket's reader
        task as they arrive (:meth:`_take_answer`): one hand-off less on the
        way back of a relayed call (iii.cluster.relay).
        """
        if isinstance(self.ws, GuardedConnection):
            self.ws.on_message = self._take_answer
        self.nursery.start_soon(self._frames.run)
        self.nursery.start_soon(self._reader)
        self.nursery.start_soon(self._heartbeat)

    def abort(self, reason: str) -> None:
        if self.drop_reason is None:
            self.drop_reason = reason
        # Also ends a direct write in progress (it runs in a caller's task,
        # shielded, outside this nursery).
        self._frames.close()
        self.nursery.cancel_scope.cancel()

    def _on_drop(self, reason: CloseReason | None) -> None:
        if reason is None:
            closed = self.ws.closed
            said = _reason_text(closed.code, closed.reason) if closed else "connection ended"
            self.abort(f"closed: {said}")
        else:
            self.abort(f"a send failed ({reason})")

    def close(self) -> None:
        """After the nursery ended: fail the calls in flight, refuse more frames."""
        self.ready = False
        for pending in list(self.pending.values()):
            pending.finish(error=self.stopped_error(pending.function_id))
        self._frames.close()

    def stopped_error(self, function_id: str) -> IIIError:
        reason = self.drop_reason or "the link dropped"
        return InvocationStoppedError(
            f"Invocation of {function_id} stopped: the link to {self.config.url} dropped ({reason})"
        )

    def send_nowait(self, frame: str) -> None:
        """Queue a frame from synchronous code; a full queue drops the connection."""
        try:
            self._frames.send_nowait(frame)
        except FrameTooLargeError as exc:
            self.abort(f"a frame to send is too large: {exc.message}")

    def offer_nowait(self, frame: str) -> bool:
        """Queue a frame from synchronous code; False (nothing queued) when the
        queue is full or the connection is ending."""
        if self._frames.closed:
            return False
        try:
            return self._frames.offer_nowait(frame)
        except FrameTooLargeError:
            return False

    async def send(self, frame: str) -> bool:
        """Write a frame now if nothing is queued, else queue it; False if the
        connection was ending already (the frame is dropped).

        A connection that ends while the frame waits drops it too: its calls
        in flight are then failed by :meth:`close`.
        """
        if self._frames.closed:
            return False
        await self._frames.send(frame)
        return True

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.config.heartbeat_interval_s)
            with trio.move_on_after(self.config.heartbeat_timeout_s) as scope:
                try:
                    await self.ws.ping()
                except ConnectionClosed as exc:
                    self.abort(f"closed: {_close_text(exc)}")
                    return
            if scope.cancelled_caught:
                self.abort(f"no pong within {self.config.heartbeat_timeout_s:g}s")
                return

    async def _reader(self) -> None:
        while True:
            try:
                frames = await receive_frames(self.ws)
            except ConnectionClosed as exc:
                self.abort(f"closed: {_close_text(exc)}")
                return
            for frame in frames:
                if isinstance(frame, bytes) and frame[:4] in TELEMETRY_PREFIXES:
                    continue
                try:
                    message = decode_message(frame)
                except MessageDecodeError as exc:
                    self._on_bad_frame(exc)
                    continue
                self._dispatch(message)

    def _take_answer(self, frame: str | bytes) -> bool:
        """In the socket's reader task: dispatch an ``invocationresult`` (as our
        engine encodes it: its ``type`` last) now; anything else is left to
        :meth:`_reader`, in order (this is offered a frame only when none waits)."""
        if (
            type(frame) is not str
            or len(frame) > DIRECT_ANSWER_MAX
            or not frame.endswith(_ANSWER_END)
        ):
            return False
        try:
            message = decode_message(frame)
        except MessageDecodeError:
            return False  # the reader reports it
        if not isinstance(message, InvocationResult):
            return False
        try:
            self._dispatch(message)
        except Exception:  # ends this connection only, as in the reader
            log.exception("link to %s: an answer could not be dispatched", self.config.url)
            self.abort("an answer could not be dispatched")
        return True

    def _on_bad_frame(self, exc: MessageDecodeError) -> None:
        self.bad_input_log.warning(
            "link to %s: skipped a frame the remote sent: %s",
            self.config.url,
            clean(exc.reason, 300),
        )
        pending = self.pending.get(exc.invocation_id or "")
        if pending is not None and exc.message_type == "invocationresult":
            pending.finish(
                error=IIIError(
                    f"the answer of {self.config.url} to {pending.function_id} cannot be read:"
                    f" {clean(exc.reason, 300)}",
                    code="deserialization_error",
                )
            )

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, InvocationResult):
            pending = self.pending.get(message.invocation_id)
            if pending is None:
                return  # late (timed out) or never ours
            if message.error is not None:
                pending.finish(error=_remote_error(message.error))
            else:
                pending.finish(result=message.result)
        elif isinstance(message, InvokeFunction):
            self._on_invoke(message)
        elif isinstance(message, Ping):
            self.send_nowait(encode_message(Pong()))
        elif isinstance(message, RegistrationRejected):
            self.bad_input_log.warning(
                "link to %s: the remote refused the registration of %s: %s",
                self.config.url,
                clean(message.function_id or message.worker_name or "?", 200),
                clean(message.code, 100),
            )
        elif isinstance(message, TriggerRegistrationResult) and message.error is not None:
            self.bad_input_log.warning(
                "link to %s: the remote refused trigger %s: %s: %s",
                self.config.url,
                clean(message.id, 200),
                clean(message.error.code, 100),
                clean(message.error.message, 300),
            )
        # Anything else (trigger registrations for a type we never provided,
        # a second workerregistered ...) means nothing to a link: ignored.

    def _on_invoke(self, message: InvokeFunction) -> None:
        exposed = self.exposed.get(message.function_id)
        invocation_id = message.invocation_id
        if exposed is None:
            if invocation_id is not None:
                self._answer_error(
                    message,
                    ErrorBody(
                        code="function_not_found",
                        message=f"Function {message.function_id} not found",
                    ),
                )
            return
        if self.running >= self.config.max_concurrent_calls:
            self.bad_input_log.warning(
                "link to %s: refused a call of %s: %d calls already running",
                self.config.url,
                clean(message.function_id, 200),
                self.running,
            )
            if invocation_id is not None:
                self._answer_error(
                    message,
                    ErrorBody(
                        code="too_many_pending_invocations",
                        message=f"the link runs at most"
                        f" {self.config.max_concurrent_calls} calls at once",
                    ),
                )
            return
        self.running += 1
        self.nursery.start_soon(self._run_exposed, exposed, message)

    def _answer_error(self, message: InvokeFunction, error: ErrorBody) -> None:
        assert message.invocation_id is not None
        self.send_nowait(
            encode_message(
                InvocationResult(
                    invocation_id=message.invocation_id,
                    function_id=message.function_id,
                    error=error,
                )
            )
        )

    async def _run_exposed(self, exposed: Exposed, message: InvokeFunction) -> None:
        try:
            trace = TraceContext(traceparent=message.traceparent, baggage=message.baggage)
            result: Any = None
            error: ErrorBody | None = None
            with trio.move_on_after(self.config.handler_timeout_s) as scope:
                try:
                    result = await exposed.handler(message.data, trace)
                except IIIError as exc:
                    error = ErrorBody(code=exc.code, message=exc.message, stacktrace=exc.stacktrace)
                except Exception:
                    log.exception(
                        "link to %s: the handler of %s failed",
                        self.config.url,
                        clean(message.function_id, 200),
                    )
                    error = ErrorBody(code="invocation_failed", message="internal error")
            if scope.cancelled_caught:
                error = ErrorBody(
                    code="timeout",
                    message=f"Invocation of {message.function_id} timed out after"
                    f" {self.config.handler_timeout_s:g}s",
                )
            if message.invocation_id is None:
                return
            answer = InvocationResult(
                invocation_id=message.invocation_id,
                function_id=message.function_id,
                result=result if error is None else None,
                error=error,
            )
            try:
                frame = encode_message(answer)
            except (orjson.JSONEncodeError, TypeError) as exc:
                frame = encode_message(
                    attrs.evolve(
                        answer,
                        result=None,
                        error=ErrorBody(
                            code="serialization_error", message=f"the result cannot be sent: {exc}"
                        ),
                    )
                )
            if len(frame.encode()) > self.config.max_message_size:
                frame = encode_message(
                    attrs.evolve(
                        answer,
                        result=None,
                        error=ErrorBody(
                            code=FrameTooLargeError.code,
                            message=f"the result is larger than the link's max_message_size"
                            f" ({self.config.max_message_size} bytes)",
                        ),
                    )
                )
            await self.send(frame)
        finally:
            self.running -= 1


def _remote_error(error: ErrorBody) -> IIIError:
    return InvocationFailedError(error.message, code=error.code, stacktrace=error.stacktrace)


def _close_text(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "connection ended"
    return _reason_text(reason.code, reason.reason)


def _reason_text(code: int, reason: str | None) -> str:
    said = f" ({clean(reason, 200)})" if reason else ""
    return f"code {code}{said}"
