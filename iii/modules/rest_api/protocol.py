"""One HTTP/1.1 connection, sans I/O: h11 driven by a ``receive`` and a ``send`` callable.

:class:`HttpConnection` is the protocol half of the REST port's server, in
the way hypercorn's ``protocol/h11.py`` is: it reads bytes by awaiting
``receive()`` (``b""`` when the peer has closed), writes by awaiting
``send(data)``, and touches no socket.  The transport half
(:mod:`.server`: listeners, admission, the lingering close) wraps a TCP
or TLS stream into those two callables; a test can hand it the two ends of
trio memory streams instead, so everything here runs in one process,
under ``autojump_clock`` if it likes.

What the protocol gives an application (``app(request, responder)``):

* **keep-alive** (h11 decides from the request's version and ``Connection``
  header) and **pipelining**: requests on one connection are served one after
  the other, in order; h11 holds the bytes of the next request until the
  current response is complete;
* a request body read on demand, in chunks of at most 64 KiB
  (:meth:`HttpRequest.receive`), with ``100 Continue`` sent when the client
  waits for it; the application may read it while it responds;
* a :class:`Responder` that sends a whole response or streams one (chunked
  when the length is unknown; HEAD, 204 and 304 answers carry no body).  Its
  state is explicit (:class:`ResponseState`); a move it does not have is a
  bug and raises :class:`IllegalTransitionError`.

Timeouts: ``HEADER_TIMEOUT`` to send a request head, ``KEEP_ALIVE_TIMEOUT``
of idleness between requests, and ``IO_TIMEOUT`` for each receive of body
bytes and each send.  A malformed request gets a JSON 400 (or h11's status
hint, e.g. 431) and the connection ends; so does a request whose framing a
proxy could read differently (:mod:`.framing`: request smuggling), and
nothing pipelined behind it is answered.

Connections of one server share a :class:`ServerState`: the drain flag
(answers then say ``Connection: close``, idle connections end), the idle
waits the drain cancels, and the count of requests in flight.

Lifetime: :meth:`HttpConnection.serve` returns when the connection should
be closed; the caller closes the transport.  The application runs in the
connection's task.
"""

from __future__ import annotations

import email.utils
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import h11
import orjson
import trio

from iii.modules.rest_api.framing import framing_problem, request_head

__all__ = [
    "HttpConnection",
    "HttpRequest",
    "Responder",
    "ResponseState",
    "IllegalTransitionError",
    "ServerState",
    "App",
    "Receive",
    "Send",
    "ClientGoneError",
    "BodyTooLargeError",
    "json_error",
    "new_error_id",
    "MAX_CHUNK",
]

log = logging.getLogger(__name__)

MAX_CHUNK = 64 * 1024
HEADER_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 60.0
IO_TIMEOUT = 30.0
# After a response, an unread request body is drained up to this size so the
# connection can be kept; a larger rest closes the connection instead.
DRAIN_LIMIT = 256 * 1024

Headers = Iterable[tuple[bytes, bytes]]
# The transport, as the protocol sees it: the next bytes from the peer (b""
# once it has closed; trio's Broken/ClosedResourceError if the stream broke),
# and a write of all of ``data``.
Receive = Callable[[], Awaitable[bytes | bytearray]]
Send = Callable[[bytes], Awaitable[None]]


class ClientGoneError(Exception):
    """The client closed the connection, timed out, or broke the protocol."""


class BodyTooLargeError(Exception):
    """The request body is larger than the application allows."""


def new_error_id() -> str:
    return uuid.uuid4().hex[:16]


def json_error(
    status: int, code: str, message: str, *, error_id: str | None = None, **extra: Any
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The one error shape of the REST port: ``{"error": {code, message, error_id}}``."""
    body = {"error": {"code": code, "message": message, "error_id": error_id or new_error_id()}}
    body.update(extra)
    return status, [(b"content-type", b"application/json")], orjson.dumps(body)


class _DateCache:
    """The ``Date`` header, formatted at most once a second."""

    def __init__(self) -> None:
        self.second = 0
        self.value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = email.utils.formatdate(now, usegmt=True).encode()
        return self.value


_DATE = _DateCache()


@attrs.define(eq=False)
class _Wire:
    """The h11 state machine of one connection, and the two callables it is driven by."""

    receive_bytes: Receive
    send_bytes: Send
    h11: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.SERVER))
    peer: str = ""
    head: bytes | None = None  # the raw head of the last request (framing checks)

    async def next_event(self) -> Any:
        """The next h11 event, reading as needed (the caller's scope bounds the wait).

        For a ``Request``, :attr:`head` is then the raw head h11 parsed it
        from (see :mod:`.framing`).
        """
        while True:
            head = None
            if self.h11.their_state is h11.IDLE:
                head = request_head(self.h11.trailing_data[0])
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                self.head = head
                return event
            self.h11.receive_data(await self.receive())

    async def receive(self) -> bytes:
        try:
            data = await self.receive_bytes()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGoneError(f"connection lost: {exc}") from None
        return data if isinstance(data, bytes) else bytes(data)  # memory streams give bytearray

    async def send(self, *events: Any) -> None:
        """Send h11 events with one write."""
        data = b"".join(self.h11.send(event) or b"" for event in events)
        if not data:
            return
        with trio.move_on_after(IO_TIMEOUT) as scope:
            try:
                await self.send_bytes(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGoneError(f"connection lost: {exc}") from None
        if scope.cancelled_caught:
            raise ClientGoneError("timed out sending to the client")


@attrs.define(eq=False)
class HttpRequest:
    """A request head, and its body read on demand."""

    method: str
    target: str
    path: str  # raw (percent-encoded)
    query: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased by h11
    http_version: str
    _conn: _Wire
    body_complete: bool = False
    _pending: bytes = b""

    @property
    def peer(self) -> str:
        return self._conn.peer

    def header(self, name: bytes) -> bytes | None:
        """The last value of a header (names are lower case)."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    @property
    def content_length(self) -> int | None:
        value = self.header(b"content-length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    @property
    def has_body(self) -> bool:
        if self.header(b"transfer-encoding") is not None:
            return True
        return bool(self.content_length)

    async def receive(self) -> bytes | None:
        """The next body chunk (at most 64 KiB), or None at the end of the body.

        Raises :class:`ClientGoneError` if the client leaves or stalls.
        """
        if self._pending:
            chunk, self._pending = self._pending[:MAX_CHUNK], self._pending[MAX_CHUNK:]
            return chunk
        if self.body_complete:
            return None
        conn = self._conn
        if conn.h11.client_is_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientGoneError(f"bad request body: {exc}") from None
            if event is h11.NEED_DATA:
                with trio.move_on_after(IO_TIMEOUT) as scope:
                    conn.h11.receive_data(await conn.receive())
                if scope.cancelled_caught:
                    raise ClientGoneError("timed out waiting for the request body")
                continue
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                if not data:
                    continue
                chunk, self._pending = data[:MAX_CHUNK], data[MAX_CHUNK:]
                return chunk
            if isinstance(event, h11.EndOfMessage):
                self.body_complete = True
                return None
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGoneError("connection closed during the request body")
            # PAUSED cannot happen while the body is incomplete.
            raise ClientGoneError(f"unexpected event {type(event).__name__}")

    async def read_all(self, limit: int) -> bytes:
        """The whole body; :class:`BodyTooLargeError` past ``limit`` bytes."""
        parts = []
        total = 0
        while (chunk := await self.receive()) is not None:
            total += len(chunk)
            if total > limit:
                raise BodyTooLargeError(f"request body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class ResponseState(enum.Enum):
    """Where a response is: the only legal moves are in ``_NEXT_STATES``."""

    NOT_STARTED = "not started"
    HEAD_SENT = "head sent"  # status line and headers out, no body byte yet
    BODY_STREAMING = "body streaming"  # at least one body chunk out
    DONE = "done"  # complete: the connection may be reused
    ABORTED = "aborted"  # cut off (client gone, bad body): the connection closes


_NEXT_STATES: dict[ResponseState, frozenset[ResponseState]] = {
    ResponseState.NOT_STARTED: frozenset(
        {ResponseState.HEAD_SENT, ResponseState.DONE, ResponseState.ABORTED}
    ),
    ResponseState.HEAD_SENT: frozenset(
        {ResponseState.BODY_STREAMING, ResponseState.DONE, ResponseState.ABORTED}
    ),
    ResponseState.BODY_STREAMING: frozenset(
        {ResponseState.BODY_STREAMING, ResponseState.DONE, ResponseState.ABORTED}
    ),
    ResponseState.DONE: frozenset(),
    ResponseState.ABORTED: frozenset(),
}


class IllegalTransitionError(RuntimeError):
    """A state machine was asked for a move it does not have: a bug in the caller."""


@attrs.define(eq=False)
class Responder:
    """Sends the response to one request: whole, or streamed.

    Its :attr:`state` (:class:`ResponseState`) moves NOT_STARTED ->
    HEAD_SENT -> BODY_STREAMING -> DONE, or to ABORTED from any state that
    is not final; anything else (a second head, a body before the head, a
    chunk after the end) raises :class:`IllegalTransitionError`.  A send
    the client does not take (:class:`ClientGoneError`) leaves it ABORTED.
    Each move is made before the write it stands for, so a second writer
    cannot slip in while the first one waits on the socket.
    """

    _conn: _Wire
    _method: str
    # True while the server drains: the answer then says ``Connection: close``.
    _closing: Callable[[], bool] = lambda: False
    extra_headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    state: ResponseState = ResponseState.NOT_STARTED
    status: int = 0
    _no_body: bool = False

    @property
    def started(self) -> bool:
        """The head went out (or the response ended without one)."""
        return self.state is not ResponseState.NOT_STARTED

    @property
    def finished(self) -> bool:
        """The response is complete: the connection may carry the next one."""
        return self.state is ResponseState.DONE

    def _move(self, new: ResponseState) -> None:
        if new not in _NEXT_STATES[self.state]:
            raise IllegalTransitionError(f"response: {self.state.value} -> {new.value}")
        self.state = new

    def abort(self) -> None:
        """Cut the response off (a final state is kept): the connection closes after it."""
        if self.state is not ResponseState.DONE:
            self.state = ResponseState.ABORTED

    async def _send(self, *events: Any) -> None:
        try:
            await self._conn.send(*events)
        except ClientGoneError:
            # Whatever the state was (DONE is entered before its last write,
            # so that no second answer can start meanwhile): the response
            # did not get through, and the connection cannot be reused.
            self.state = ResponseState.ABORTED
            raise

    def _head(self, status: int, headers: Headers, length: bytes | None) -> h11.Response:
        all_headers = [(b"date", _DATE.get()), *headers, *self.extra_headers]
        if length is not None:
            all_headers.append((b"content-length", length))
        if self._closing():
            all_headers.append((b"connection", b"close"))
        return h11.Response(status_code=status, headers=all_headers)  # validates

    async def start(self, status: int, headers: Headers) -> None:
        """Send the status line and headers (``h11.LocalProtocolError`` if invalid:
        the state is then unchanged, and an error can still be sent)."""
        if self.state is not ResponseState.NOT_STARTED:
            raise IllegalTransitionError(f"response: {self.state.value} -> head sent")
        response = self._head(status, headers, None)
        self._move(ResponseState.HEAD_SENT)
        self.status = status
        self._no_body = self._method == "HEAD" or status in (204, 304)
        await self._send(response)

    async def send(self, data: bytes) -> None:
        """One body chunk (nothing for an empty one, or an answer without a body)."""
        if not data:
            return
        self._move(ResponseState.BODY_STREAMING)
        if not self._no_body:
            await self._send(h11.Data(data=data))

    async def end(self) -> None:
        """The end of a started response."""
        if self.state is ResponseState.NOT_STARTED:
            raise IllegalTransitionError(f"response: {self.state.value} -> done")
        self._move(ResponseState.DONE)
        await self._send(h11.EndOfMessage())

    async def respond(self, status: int, headers: Headers, body: bytes = b"") -> None:
        """A whole response with its ``content-length``, in one write."""
        if self.state is not ResponseState.NOT_STARTED:
            raise IllegalTransitionError(f"response: {self.state.value} -> done")
        response = self._head(status, headers, str(len(body)).encode())
        self._move(ResponseState.DONE)
        self.status = status
        if self._method == "HEAD" or status in (204, 304) or not body:
            await self._send(response, h11.EndOfMessage())
        else:
            await self._send(response, h11.Data(data=body), h11.EndOfMessage())

    async def respond_error(self, status: int, code: str, message: str, **extra: Any) -> None:
        status, headers, body = json_error(status, code, message, **extra)
        await self.respond(status, headers, body)


def _split_target(target: str) -> tuple[str, str]:
    if target.startswith(("http://", "https://")):  # absolute-form
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    return path, query


App = Callable[[HttpRequest, Responder], Awaitable[None]]


@attrs.define(eq=False)
class ServerState:
    """What the connections of one server share."""

    draining: bool = False  # answers say Connection: close; no new request is read
    active_requests: int = 0
    # The waits for a next request: the drain cancels them.
    idle: set[trio.CancelScope] = attrs.field(factory=set)

    def is_draining(self) -> bool:
        return self.draining

    def begin_drain(self) -> None:
        """Idle connections end now, busy ones after their response."""
        self.draining = True
        for scope in list(self.idle):
            scope.cancel()


@attrs.define(eq=False)
class HttpConnection:
    """One connection's HTTP/1.1 protocol, served to ``app``; see the module docstring."""

    app: App
    receive: Receive
    send: Send
    peer: str = ""
    shared: ServerState = attrs.field(factory=ServerState)
    _wire: _Wire = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._wire = _Wire(self.receive, self.send, peer=self.peer)

    @property
    def body_unread(self) -> bool:
        """The client may still be sending a request body we did not read (at
        the end: close with a linger, so it reads our answer, not a reset)."""
        return self._wire.h11.their_state is h11.SEND_BODY

    async def serve(self) -> None:
        """Serve requests until the connection ends; :class:`ClientGoneError`
        when the client leaves, stalls or breaks the protocol mid-request."""
        conn = self._wire
        shared = self.shared
        first = True
        while not shared.draining:
            timeout = HEADER_TIMEOUT if first else KEEP_ALIVE_TIMEOUT
            first = False
            # One scope for both ends of the wait: its deadline, and the drain.
            with trio.CancelScope(deadline=trio.current_time() + timeout) as idle_scope:
                shared.idle.add(idle_scope)
                try:
                    event = await conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(conn, exc)
                    return
                finally:
                    shared.idle.discard(idle_scope)
            if idle_scope.cancelled_caught or not isinstance(event, h11.Request):
                return  # draining, or the client closed
            request = self._make_request(conn, event)
            problem = framing_problem(event.http_version, request.headers, conn.head)
            if problem is not None:
                # Refused, and nothing pipelined behind it is read (smuggling).
                await self._refuse(conn, *problem)
                return
            responder = Responder(conn, request.method, shared.is_draining)
            shared.active_requests += 1
            try:
                await self._run_app(request, responder)
            finally:
                shared.active_requests -= 1
            if responder.state is not ResponseState.DONE:
                return  # the response was cut off: the connection cannot be reused
            if conn.h11.our_state is h11.MUST_CLOSE or shared.draining:
                return
            if conn.h11.their_state is h11.SEND_BODY and not await self._drain_body(request):
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    def _make_request(self, conn: _Wire, event: h11.Request) -> HttpRequest:
        target = event.target.decode("utf-8", "replace")
        path, query = _split_target(target)
        return HttpRequest(
            method=event.method.decode("ascii", "replace").upper(),
            target=target,
            path=path,
            query=query,
            headers=list(event.headers),
            http_version=event.http_version.decode("ascii", "replace"),
            conn=conn,
        )

    async def _run_app(self, request: HttpRequest, responder: Responder) -> None:
        try:
            await self.app(request, responder)
        except ClientGoneError:
            raise
        except Exception:
            error_id = new_error_id()
            log.exception("%s %s failed (error_id %s)", request.method, request.path, error_id)
            if responder.state is ResponseState.NOT_STARTED:
                await responder.respond_error(
                    500, "INTERNAL_ERROR", "internal server error", error_id=error_id
                )
            return
        if responder.state is ResponseState.NOT_STARTED:
            await responder.respond_error(500, "INTERNAL_ERROR", "no response was produced")
        elif responder.state is not ResponseState.DONE:
            raise ClientGoneError("the application left a response unfinished")

    async def _drain_body(self, request: HttpRequest) -> bool:
        """Read the rest of an unread request body; False if it is too large."""
        total = 0
        try:
            while (chunk := await request.receive()) is not None:
                total += len(chunk)
                if total > DRAIN_LIMIT:
                    return False
        except ClientGoneError:
            return False
        return True

    async def _protocol_error(self, conn: _Wire, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 600 else 400
        await self._refuse(conn, status, str(exc))

    async def _refuse(self, conn: _Wire, status: int, reason: str) -> None:
        """A JSON error for a request that cannot be served, with ``Connection: close``."""
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status, headers, body = json_error(status, "BAD_REQUEST", f"malformed request: {reason}")
        try:
            await conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        *headers,
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                )
            )
            await conn.send(h11.Data(data=body))
            await conn.send(h11.EndOfMessage())
        except (ClientGoneError, h11.LocalProtocolError):
            pass
