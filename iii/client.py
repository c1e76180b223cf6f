"""The client side of the shell commands: one short connection to a running engine.

``python -m iii trigger | functions | workers | triggers`` (wired in
:mod:`iii.cli`) connect to the engine's worker port as a worker would, make
one call, and leave:

* :class:`Endpoint`: where to connect (``ws://`` or ``wss://`` URL, default
  ``$III_URL`` else ``ws://127.0.0.1:49134``) and the bearer token
  (``--token`` or ``$III_TOKEN``, the variable the 0.25 SDK reads).
* :func:`open_session`: TCP, then TLS against the system trust store (which
  OpenSSL lets ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` replace), then the
  WebSocket upgrade with ``Authorization: Bearer``, then the engine's
  ``workerregistered``.  The session then reports its metadata with a
  request/response ``engine::workers::register`` (name ``iii-cli``, feature
  ``large-messages.v1``), so the engine knows the command takes answers up to
  :data:`MAX_MESSAGE_SIZE` before the real call starts.
* :meth:`Session.call` and :meth:`Session.call_void`: one ``invokefunction``
  (with or without an ``invocation_id``) through :mod:`iii.protocol`'s codec.

The engine is a peer like any other.  Its refusal body is capped
(:data:`UPGRADE_BYTES`: a refusal that never ends is cut off), a socket it
closes during the upgrade fails at once rather than at the timeout, its frames
are capped at :data:`MAX_MESSAGE_SIZE`, its undecodable frames are skipped (an
answer to our call that cannot be read fails the call), and every string it
sends is escaped before it reaches a terminal (:mod:`iii.client_io`).  The
callers bound every wait with ``--timeout``.

Failures are :class:`ClientError` subclasses; ``cli.py`` maps each to its exit
code.

Lifetime: a session lives inside one ``async with``; its WebSocket reader
runs in the session's nursery, and its socket is closed when the block ends.
"""

from __future__ import annotations

import logging
import os
import platform
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)

from iii import __version__
from iii.errors import MessageDecodeError
from iii.log import bounded_repr, clean
from iii.protocol import (
    ErrorBody,
    InvocationResult,
    InvokeFunction,
    Message,
    WorkerRegistered,
    decode_message,
    encode_message,
)
from iii.wsconnection import open_client_connection

__all__ = [
    "DEFAULT_URL",
    "DEFAULT_TIMEOUT",
    "MAX_MESSAGE_SIZE",
    "UPGRADE_BYTES",
    "CLOSE_TIMEOUT",
    "ClientError",
    "UsageError",
    "EngineUnreachableError",
    "CallFailedError",
    "CallTimeoutError",
    "BadAnswerError",
    "Endpoint",
    "Session",
    "open_session",
    "client_metadata",
    "call_function",
    "fetch_list",
    "LISTS",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_URL: Final = "ws://127.0.0.1:49134"
DEFAULT_TIMEOUT: Final = 30.0
# The largest message the command accepts: the engine's own default
# max_message_size.  trio-websocket holds one message at a time.
MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024
# What the engine may send before the upgrade completes: a status line,
# headers and a refusal body.  Far more than any real answer needs.
UPGRADE_BYTES: Final = 256 * 1024
# The closing handshake after the call, bounded on its own (a fire-and-forget
# call waits for it: the engine's Close means it has read the call).
CLOSE_TIMEOUT: Final = 5.0
# What the command says about itself (engine::workers::register).
CLIENT_NAME: Final = "iii-cli"


class ClientError(Exception):
    """A failure of a client command, with a one-line message safe to print."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(ClientError):
    """Bad arguments: nothing was sent."""


class EngineUnreachableError(ClientError):
    """No usable connection: refused, closed, TLS failed, not an iii engine, or lost."""


class CallTimeoutError(ClientError):
    """The call was sent and no answer came in time: it may or may not have run."""


class BadAnswerError(ClientError):
    """The engine answered something the command cannot read."""


class CallFailedError(ClientError):
    """The call was answered with an error body."""

    def __init__(self, function_id: str, error: ErrorBody):
        super().__init__(f"{function_id}: {error.code}: {error.message}")
        self.function_id = function_id
        self.error = error


# -- where to connect ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Endpoint:
    url: str
    host: str
    port: int
    resource: str
    tls: bool
    token: str | None = attrs.field(default=None, repr=False)
    # A PEM file of CA certificates trusted for wss:// instead of the system
    # store (the engine link's ``ca_file``); None: the system store.
    ca_file: str | None = None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @classmethod
    def from_options(
        cls,
        *,
        url: str | None,
        address: str | None,
        port: int | None,
        token: str | None,
        environ: Mapping[str, str] = os.environ,
    ) -> Endpoint:
        """``--url``, or upstream's ``--address``/``--port``; else ``$III_URL``; else default."""
        if url is not None and (address is not None or port is not None):
            raise UsageError("give either --url or --address/--port, not both")
        if address is not None or port is not None:
            host = address or "127.0.0.1"
            url = f"ws://{f'[{host}]' if ':' in host else host}:{port or 49134}"
        elif url is None:
            url = environ.get("III_URL") or DEFAULT_URL
        if token is None:
            token = environ.get("III_TOKEN") or None
        return cls.parse(url, token)

    @classmethod
    def parse(cls, url: str, token: str | None = None, *, ca_file: str | None = None) -> Endpoint:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"bad engine URL {bounded_repr(url)}: {exc}") from None
        if parts.scheme not in ("ws", "wss"):
            raise UsageError(f"bad engine URL {bounded_repr(url)}: use ws:// or wss://")
        if not parts.hostname:
            raise UsageError(f"bad engine URL {bounded_repr(url)}: no host")
        if token is not None and not _is_header_value(token):
            raise UsageError("the token must be printable ASCII without spaces")
        tls = parts.scheme == "wss"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(
            url=url,
            host=parts.hostname,
            port=port if port is not None else (443 if tls else 80),
            resource=resource,
            tls=tls,
            token=token,
            ca_file=ca_file,
        )


def _is_header_value(token: str) -> bool:
    return bool(token) and all("\x21" <= char <= "\x7e" for char in token)


# -- the connection -----------------------------------------------------------------------


class _UpgradeAbortedError(EngineUnreachableError):
    pass


class _UpgradeGuard(trio.abc.Stream):
    """The socket as trio-websocket sees it, watched until the upgrade is done.

    trio-websocket's client waits forever when the socket closes before the
    101 (its reader stops, the handshake event is never set), and keeps a
    refusal's whole body in memory.  Until :meth:`upgraded`, an end of
    stream, a broken socket or more than :data:`UPGRADE_BYTES` received
    raises :class:`_UpgradeAbortedError` out of its reader instead.
    """

    def __init__(self, inner: trio.abc.Stream, budget: int = UPGRADE_BYTES):
        self._inner = inner
        self._budget = budget
        self._upgrading = True

    def upgraded(self) -> None:
        self._upgrading = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._upgrading:
            return await self._inner.receive_some(max_bytes)
        try:
            data = await self._inner.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            raise _UpgradeAbortedError(
                f"the connection broke before an answer to the WebSocket upgrade:"
                f" {exc.__cause__ or exc}"
            ) from None
        if not data:
            raise _UpgradeAbortedError(
                "the engine closed the connection without answering the WebSocket upgrade"
                " (a wss:// port, or a limit on connections?)"
            )
        self._budget -= len(data)
        if self._budget < 0:
            raise _UpgradeAbortedError(
                f"the engine sent more than {UPGRADE_BYTES} bytes without completing the upgrade"
            )
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


def _ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    # The system store (OpenSSL reads SSL_CERT_FILE / SSL_CERT_DIR instead
    # when set), or only the CAs of ``ca_file``.
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise EngineUnreachableError(f"cannot read the CA file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def _open_stream(endpoint: Endpoint) -> trio.abc.Stream:
    context = _ssl_context(endpoint.ca_file) if endpoint.tls else None
    try:
        tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise EngineUnreachableError(
            f"cannot connect to {endpoint.url}: {_os_reason(exc)}"
        ) from None
    if context is None:
        return tcp
    tls = trio.SSLStream(tcp, context, server_hostname=endpoint.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        reason = exc.__cause__ or exc
        raise EngineUnreachableError(f"TLS with {endpoint.url} failed: {reason}") from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


_REFUSAL_HINTS = {
    401: " (a valid token is needed: --token or III_TOKEN)",
    403: " (this token may not connect)",
    404: " (is the URL's path right?)",
    503: " (the engine is at its connection limit)",
}


def _translate(exc: BaseException, endpoint: Endpoint) -> ClientError | None:
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, ConnectionRejected):
        hint = _REFUSAL_HINTS.get(exc.status_code, "")
        body = clean(exc.body.decode(errors="replace").strip(), 200) if exc.body else ""
        said = f": {body}" if body else ""
        return EngineUnreachableError(
            f"{endpoint.url} refused the connection: HTTP {exc.status_code}{hint}{said}"
        )
    if isinstance(exc, ConnectionClosed):
        return EngineUnreachableError(f"{endpoint.url}: {_describe_close(exc.reason)}")
    if isinstance(exc, (trio.BrokenResourceError, OSError)):
        return EngineUnreachableError(f"{endpoint.url}: the connection broke: {exc}")
    return None


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The group's one exception; None if it holds several, or a Cancelled (never swallowed)."""
    leaves = list(_leaves(group))
    return leaves[0] if len(leaves) == 1 and not isinstance(leaves[0], trio.Cancelled) else None


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@contextmanager
def _translated(endpoint: Endpoint) -> Iterator[None]:
    """The one exception of a session's nursery, as a :class:`ClientError`."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        translated = _translate(leaf, endpoint) if leaf is not None else None
        if translated is None:
            raise
        raise translated from None


def _describe_close(reason: CloseReason | None) -> str:
    if reason is None:
        return "the connection closed"
    said = f" ({clean(reason.reason, 200)})" if reason.reason else ""
    # Neutral: the code may be the engine's, or ours (1009: a frame too large).
    return f"the connection closed: code {reason.code}{said}"


@attrs.define(eq=False)
class Session:
    """One connection to the engine, as a worker that registers nothing."""

    ws: WebSocketConnection
    endpoint: Endpoint
    worker_id: str = ""
    # What the engine gave for a later ``reattach`` (None: it offers none).
    reattach_token: str | None = None

    async def _receive(self, waiting_for: str) -> Message | MessageDecodeError:
        try:
            frame = await self.ws.get_message()
        except ConnectionClosed as exc:
            raise EngineUnreachableError(
                f"{_describe_close(exc.reason)} before {waiting_for}"
            ) from None
        try:
            return decode_message(frame)
        except MessageDecodeError as exc:
            log.debug("skipped a frame the engine sent: %r", exc.reason)
            return exc

    async def greeting(self) -> None:
        """Wait for ``workerregistered``: the peer is an iii engine that took us in."""
        while True:
            message = await self._receive("it greeted this worker (is this an iii engine?)")
            if isinstance(message, WorkerRegistered):
                self.worker_id = message.worker_id
                self.reattach_token = message.reattach_token
                return

    async def introduce(self, metadata: Mapping[str, Any] | None = None) -> None:
        """Report this client's metadata, and wait until the engine has applied it.

        ``metadata`` defaults to the command's own (:func:`client_metadata`).
        An engine without ``engine::workers::register``, or one that refuses
        it, still serves the client (with its default frame limit).
        """
        try:
            await self.call(
                "engine::workers::register",
                dict(metadata) if metadata is not None else client_metadata(),
            )
        except CallFailedError as exc:
            log.debug("engine::workers::register refused: %r", exc.message)

    async def call(self, function_id: str, data: Any) -> Any:
        """One request/response call; its result, or :class:`CallFailedError`."""
        invocation_id = str(uuid.uuid4())
        await self._send(
            InvokeFunction(function_id=function_id, data=data, invocation_id=invocation_id)
        )
        while True:
            message = await self._receive(f"answering the call of {function_id}")
            if isinstance(message, MessageDecodeError):
                if message.invocation_id == invocation_id:
                    raise BadAnswerError(
                        f"the answer to {function_id} cannot be read: {clean(message.reason, 400)}"
                    )
                continue
            if isinstance(message, InvocationResult) and message.invocation_id == invocation_id:
                if message.error is not None:
                    raise CallFailedError(function_id, message.error)
                return message.result

    async def call_void(self, function_id: str, data: Any) -> None:
        """Fire and forget: no ``invocation_id``, nothing comes back."""
        await self._send(InvokeFunction(function_id=function_id, data=data))

    async def _send(self, message: InvokeFunction) -> None:
        try:
            await self.ws.send_message(encode_message(message))
        except ConnectionClosed as exc:
            raise EngineUnreachableError(_describe_close(exc.reason)) from None


def client_metadata(
    name: str = CLIENT_NAME, description: str = "iii command line client"
) -> dict[str, Any]:
    """What a client reports in ``engine::workers::register``."""
    return {
        "name": name,
        "runtime": "python",
        "version": __version__,
        "os": platform.system().lower(),
        "pid": os.getpid(),
        "description": description,
        "features": ["large-messages.v1"],
    }


@asynccontextmanager
async def open_session(
    endpoint: Endpoint,
    *,
    metadata: Mapping[str, Any] | None = None,
    max_message_size: int = MAX_MESSAGE_SIZE,
    close_timeout: float = CLOSE_TIMEOUT,
) -> AsyncIterator[Session]:
    """Connect, upgrade, be greeted and introduce ourselves; close on exit.

    ``metadata`` is what ``engine::workers::register`` reports (default: the
    command's own); frames larger than ``max_message_size`` close the
    connection (1009).  Leaving the block closes the WebSocket (bounded by
    ``close_timeout``, even when the block was cancelled) and then the
    socket.  The caller bounds the whole with its own deadline.
    """
    stream = await _open_stream(endpoint)
    # The WebSocket reader outlives a cancellation of the block until the
    # closing handshake is done: cancelled with the rest, it could not read
    # the engine's Close, and the close would always wait its whole timeout.
    reader_scope = trio.CancelScope(shield=True)
    try:
        with _translated(endpoint):
            async with trio.open_nursery() as session_nursery:
                try:
                    guard = _UpgradeGuard(stream)
                    headers = (
                        [(b"Authorization", f"Bearer {endpoint.token}".encode())]
                        if endpoint.token
                        else None
                    )
                    ws = await open_client_connection(
                        session_nursery,
                        guard,
                        endpoint.host_header,
                        endpoint.resource,
                        extra_headers=headers,
                        max_message_size=max_message_size,
                        reader_scope=reader_scope,
                    )
                    guard.upgraded()
                    session = Session(ws, endpoint)
                    try:
                        await session.greeting()
                        await session.introduce(metadata)
                        yield session
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(close_timeout):
                            await ws.aclose()
                finally:
                    reader_scope.cancel()
                    session_nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


# These functions own their deadline (ASYNC109 would have the caller's cancel
# scope): which error a timeout is depends on whether the session was open.
async def _within(
    endpoint: Endpoint,
    timeout: float,  # noqa: ASYNC109
    what: str,
    work: Callable[[Session], Awaitable[T]],
) -> T:
    """Connect and run ``work``, all within ``timeout`` seconds.

    Running out of time before the session is open is
    :class:`EngineUnreachableError` (nothing was sent); after, it is
    :class:`CallTimeoutError` (the call may have run).
    """
    connected = False
    with trio.move_on_after(timeout) as deadline:
        async with open_session(endpoint) as session:
            connected = True
            return await work(session)
    assert deadline.cancelled_caught
    if not connected:
        raise EngineUnreachableError(
            f"no answer from {endpoint.url} within {timeout:g}s while connecting"
        )
    raise CallTimeoutError(f"no answer from {what} within {timeout:g}s")


async def call_function(
    endpoint: Endpoint,
    function_id: str,
    data: Any,
    *,
    timeout: float,  # noqa: ASYNC109
    void: bool = False,
) -> Any:
    """One call of ``function_id``: its result (None for ``void``)."""

    async def work(session: Session) -> Any:
        if void:
            await session.call_void(function_id, data)
            return None
        return await session.call(function_id, data)

    return await _within(endpoint, timeout, function_id, work)


# The shell command, the engine function it calls.
LISTS: Final = {
    "functions": "engine::functions::list",
    "workers": "engine::workers::list",
    "triggers": "engine::triggers::list",
}


async def fetch_list(
    endpoint: Endpoint,
    kind: str,
    *,
    timeout: float,  # noqa: ASYNC109
    include_internal: bool = False,
) -> dict[str, Any]:
    """The answer of ``engine::<kind>::list``: an object whose ``kind`` is a list of objects.

    ``workers`` leaves out this command's own connection.
    """
    function_id = LISTS[kind]
    own_id = ""

    async def work(session: Session) -> Any:
        nonlocal own_id
        own_id = session.worker_id
        data = {"include_internal": True} if include_internal else {}
        return await session.call(function_id, data)

    answer = await _within(endpoint, timeout, function_id, work)
    entries = answer.get(kind) if isinstance(answer, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise BadAnswerError(f"{function_id} answered no list of {kind}: {bounded_repr(answer)}")
    assert isinstance(answer, dict)
    if kind == "workers":
        answer[kind] = [entry for entry in entries if entry.get("id") != own_id]
    return answer
