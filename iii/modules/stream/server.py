"""The stream module's WebSocket server for clients (browsers …), default port 3112.

Client protocol (spec modules.md §4.2), on path ``/``:

* upgrade: with ``auth_function`` set, it is called first with
  ``{"headers": {lowercase name: value}, "path", "query_params": {name:
  [values]}, "addr": "ip:port"}``; the ``context`` of its result is kept for
  the connection and handed to the join/leave triggers.  A failed auth (the
  function is absent, fails, answers null or a non-object, or does not answer
  within ``auth_timeout_ms``) refuses the upgrade with HTTP 401, logged at
  WARNING with the peer and the reason (v0.4 accepted the connection without
  a context: an auth function that fails open is no gate).
* client → server, text or binary JSON:
  ``{"type": "join"|"leave", "data": {"subscriptionId", "streamName", "groupId", "id"?}}``.
  Anything else is ignored (logged at debug level), as upstream.
* join: the ``stream:join`` triggers run one after another with
  ``{subscription_id, stream_name, group_id, id, context}``; one answering
  ``{"unauthorized": true}`` refuses the join: the client gets an
  ``unauthorized`` event and nothing is subscribed.  Otherwise the client
  gets a ``sync`` event: the item (``id`` given) or the group's values.
  Events for the subscription that happen while the sync is read are held
  and sent right after it, so the client never misses one.
* server → client: ``{"type": "stream", "timestamp": ms, "streamName",
  "groupId", "id", "event": {"type": "sync|create|update|delete|unauthorized"
  [, "data"]}}`` or ``"event": {"type": "event", "event": {"type", "data"}}``
  for ``stream::send``.  **One copy per matching subscription** (a
  subscription matches when the stream and group are equal and it has no id
  or the same id).
* leave, and socket close for every remaining subscription: the
  ``stream:leave`` triggers run, the subscription goes.  WebSocket pings are
  answered by trio-websocket.

Each connection has a bounded outgoing queue drained by its own writer task;
a client that falls ``QUEUE_SIZE`` messages behind is disconnected (close
code 1008) instead of slowing down the writers or the other clients; if it
does not read at all (its socket is full), its connection is cancelled
``SLOW_CLIENT_GRACE`` seconds later, whether its queue overflowed or not (a
write that blocks that long ends it too).

Lifetime: :meth:`StreamServer.serve` runs the listener; each connection runs
in the server's connection nursery with its reader and writer in a
per-connection nursery, so a closed socket ends exactly its own tasks.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from iii import json_limits
from iii.admission import Admission, ConnectionLimits
from iii.binding import NO_KEYS
from iii.containment import start_contained
from iii.inbound import InboundBudget
from iii.wsserver import ConnectionOptions, Upgrade, serve_websockets

__all__ = [
    "StreamServer",
    "ClientConnection",
    "Subscription",
    "stream_message",
    "MAX_CLIENT_MESSAGE",
]

log = logging.getLogger(__name__)

QUEUE_SIZE = 1024
# The largest message a client may send (a join or leave is a few hundred bytes).
MAX_CLIENT_MESSAGE = 1024 * 1024
# A client whose queue overflowed gets this long to take what is queued and
# the 1008 close; then its connection is cancelled, even if a send is stuck
# on a socket it no longer reads.
SLOW_CLIENT_GRACE = 10.0


def now_ms() -> int:
    return int(time.time() * 1000)


def stream_message(
    stream: str, group: str, item: str | None, event: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "stream",
        "timestamp": now_ms(),
        "streamName": stream,
        "groupId": group,
        "id": item,
        "event": event,
    }


@attrs.define(eq=False)
class Subscription:
    connection: ClientConnection
    subscription_id: str
    stream: str
    group: str
    item: str | None
    # While the sync is being read, events are held here (None once synced).
    held: list[bytes] | None = attrs.field(factory=list)

    def matches(self, item: Any) -> bool:
        return self.item is None or self.item == item


@attrs.define(eq=False)
class ClientConnection:
    ws: WebSocketConnection
    addr: str
    context: Any = None
    subscriptions: dict[str, Subscription] = attrs.field(factory=dict)
    _send: trio.MemorySendChannel[bytes] | None = None
    # The per-connection scope (reader, writer): bounded once the client overflows.
    _scope: trio.CancelScope | None = None
    closed: bool = False

    def push(self, frame: bytes) -> None:
        """Queue a frame; a client too far behind is disconnected."""
        if self.closed or self._send is None:
            return
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            log.warning(
                "stream client %s is %d messages behind: disconnecting it", self.addr, QUEUE_SIZE
            )
            self.closed = True
            self._send.close()
            if self._scope is not None:
                self._scope.deadline = min(
                    self._scope.deadline, trio.current_time() + SLOW_CLIENT_GRACE
                )
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.closed = True


# (payload for the join/leave triggers) -> refused?
JoinHook = Callable[[str, dict[str, Any]], Awaitable[bool]]
SyncReader = Callable[[str, str, str | None], Awaitable[Any]]
# (auth input) -> (context, None) when accepted, (None, reason) when refused
AuthHook = Callable[[dict[str, Any]], Awaitable[tuple[Any, str | None]]]


class StreamServer:
    """Client connections, their subscriptions, and delivery of stream messages."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        authenticate: AuthHook | None,
        run_join_triggers: JoinHook,
        read_sync: SyncReader,
        ssl_context: ssl.SSLContext | None = None,
        limits: ConnectionLimits | None = None,
        inbound: InboundBudget | None = None,
        inbound_wait_timeout: float = 15.0,
        listen_keys: tuple[str, bool] = NO_KEYS,
    ):
        self.host = host
        self.port = port
        self.listen_keys = listen_keys  # the config keys of host and port (iii.binding)
        # Who holds a socket on the port (iii.admission); clients hold no
        # credential, so every one counts against its address's share.
        self.sockets = Admission(
            limits or ConnectionLimits(max_connections=4096, max_per_address=128)
        )
        self.ssl_context = ssl_context  # set: the port speaks wss://
        # What a client's socket may hold of its messages: one queued (a few
        # KiB), then the engine's max_inbound_bytes (iii.wsserver).
        self.options = ConnectionOptions(
            max_message_size=MAX_CLIENT_MESSAGE,
            handshake_timeout=10.0,
            close_timeout=2.0,
            inbound=inbound,
            inbound_wait_timeout=inbound_wait_timeout,
        )
        self.authenticate = authenticate
        self.run_join_triggers = run_join_triggers
        self.read_sync = read_sync
        self.listen_port: int | None = None
        self.connections: set[ClientConnection] = set()
        # (stream, group) -> subscriptions, for delivery without scanning every client
        self.by_group: dict[tuple[str, str], set[Subscription]] = {}

    # -- delivery -------------------------------------------------------------------

    def deliver(self, message: dict[str, Any]) -> int:
        """Send a stream message to every matching subscription; returns how many."""
        subscriptions = self.by_group.get((message["streamName"], message["groupId"]))
        if not subscriptions:
            return 0
        frame = orjson.dumps(message)
        sent = 0
        for subscription in list(subscriptions):
            if not subscription.matches(message["id"]):
                continue
            if subscription.held is not None:
                subscription.held.append(frame)
            else:
                subscription.connection.push(frame)
            sent += 1
        return sent

    def _add(self, subscription: Subscription) -> None:
        old = subscription.connection.subscriptions.get(subscription.subscription_id)
        if old is not None:
            self._remove(old)
        subscription.connection.subscriptions[subscription.subscription_id] = subscription
        self.by_group.setdefault((subscription.stream, subscription.group), set()).add(subscription)

    def _remove(self, subscription: Subscription) -> None:
        subscription.connection.subscriptions.pop(subscription.subscription_id, None)
        key = (subscription.stream, subscription.group)
        group = self.by_group.get(key)
        if group is not None:
            group.discard(subscription)
            if not group:
                del self.by_group[key]

    # -- serving --------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as connection_nursery:
            server = await connection_nursery.start(
                partial(
                    serve_websockets,
                    self._serve_request,
                    host=self.host,
                    port=self.port,
                    ssl_context=self.ssl_context,
                    admission=self.sockets,
                    options=self.options,
                    port_name="stream port",
                    handler_nursery=connection_nursery,
                    keys=self.listen_keys,
                )
            )
            self.listen_port = server.port
            scheme = "wss" if self.ssl_context is not None else "ws"
            log.info("stream server listening on %s://%s:%d", scheme, self.host, server.port)
            task_status.started(server.port)

    async def _serve_request(self, upgrade: Upgrade) -> None:
        """One client socket (supervised by :mod:`iii.wsserver`: a failure ends it only)."""
        addr = upgrade.peer
        target = urlsplit(upgrade.path)
        if (target.path or "/") != "/":
            await upgrade.reject(404, body=b"Not Found")
            return
        context = None
        if self.authenticate is not None:
            context, refusal = await self.authenticate(_auth_input(upgrade.request, addr))
            if refusal is not None:
                log.warning("stream client %s refused (401): %s", addr, refusal)
                await upgrade.reject(401, body=b"Unauthorized")
                return
        ws = await upgrade.accept()
        connection = ClientConnection(ws=ws, addr=addr, context=context)
        await self._run_connection(connection)

    async def _run_connection(self, connection: ClientConnection) -> None:
        send, receive = trio.open_memory_channel[bytes](QUEUE_SIZE)
        connection._send = send
        self.connections.add(connection)
        try:
            async with trio.open_nursery() as connection_nursery:
                connection._scope = connection_nursery.cancel_scope
                connection_nursery.start_soon(
                    self._writer, connection, receive, connection_nursery.cancel_scope
                )
                await self._reader(connection, connection_nursery)
                connection_nursery.cancel_scope.cancel()
        finally:
            self.connections.discard(connection)
            connection.closed = True
            remaining = list(connection.subscriptions.values())
            for subscription in remaining:
                self._remove(subscription)
            if remaining:
                # The leave triggers run after the socket is gone; shielded so a
                # closing connection still reports its leaves, and bounded to
                # 5 s in all so a slow leave trigger cannot hold up a shutdown.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    for subscription in remaining:
                        await self.run_join_triggers(
                            "stream:leave", _join_payload(subscription, connection)
                        )

    async def _writer(
        self,
        connection: ClientConnection,
        receive: trio.MemoryReceiveChannel[bytes],
        scope: trio.CancelScope,
    ) -> None:
        async with receive:
            async for frame in receive:
                with trio.move_on_after(SLOW_CLIENT_GRACE) as stalled:
                    await connection.ws.send_message(frame.decode())
                if stalled.cancelled_caught:
                    # Its socket is full and stays full: no Close can get through.
                    log.warning(
                        "stream client %s took nothing for %gs: disconnecting it",
                        connection.addr,
                        SLOW_CLIENT_GRACE,
                    )
                    connection.closed = True
                    scope.cancel()
                    return
        # The queue was closed: a slow consumer (see ClientConnection.push).
        with trio.move_on_after(2):
            await connection.ws.aclose(code=1008, reason="too slow: messages were not read in time")
        scope.cancel()

    async def _reader(self, connection: ClientConnection, connection_nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await connection.ws.get_message()
            except ConnectionClosed:
                return
            try:
                message = json_limits.loads(frame)
                kind = message["type"]
                data = message["data"]
                sub = Subscription(
                    connection=connection,
                    subscription_id=str(data["subscriptionId"]),
                    stream=_str(data["streamName"]),
                    group=_str(data["groupId"]),
                    item=_str(data["id"]) if data.get("id") is not None else None,
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                log.debug(
                    "stream client %s sent an unreadable message (%r); ignored",
                    connection.addr,
                    exc,
                )
                continue
            if kind == "join":
                # In order: a leave right after a join must find the subscription.
                await self._join(sub)
            elif kind == "leave":
                existing = connection.subscriptions.get(sub.subscription_id)
                if existing is not None:
                    self._remove(existing)
                    start_contained(
                        connection_nursery,
                        f"stream:leave triggers of client {connection.addr}",
                        self.run_join_triggers,
                        "stream:leave",
                        _join_payload(existing, connection),
                    )
            else:
                log.debug("stream client %s sent message type %r; ignored", connection.addr, kind)

    async def _join(self, subscription: Subscription) -> None:
        connection = subscription.connection
        refused = await self.run_join_triggers(
            "stream:join", _join_payload(subscription, connection)
        )
        if refused:
            connection.push(
                orjson.dumps(
                    stream_message(
                        subscription.stream,
                        subscription.group,
                        subscription.item,
                        {"type": "unauthorized"},
                    )
                )
            )
            return
        self._add(subscription)  # events from now on are held until the sync is out
        try:
            data = await self.read_sync(subscription.stream, subscription.group, subscription.item)
        except Exception as exc:
            log.warning(
                "stream sync for %s/%s failed: %s", subscription.stream, subscription.group, exc
            )
            data = None
        connection.push(
            orjson.dumps(
                stream_message(
                    subscription.stream,
                    subscription.group,
                    subscription.item,
                    {"type": "sync", "data": data},
                )
            )
        )
        held, subscription.held = subscription.held or [], None
        for frame in held:
            connection.push(frame)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _join_payload(subscription: Subscription, connection: ClientConnection) -> dict[str, Any]:
    return {
        "subscription_id": subscription.subscription_id,
        "stream_name": subscription.stream,
        "group_id": subscription.group,
        "id": subscription.item,
        "context": connection.context,
    }


def _auth_input(request: WebSocketRequest, addr: str) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers:
        headers[raw_name.decode("latin-1").lower()] = raw_value.decode("latin-1")
    target = urlsplit(request.path)
    query: dict[str, list[str]] = {}
    for pair in target.query.split("&") if target.query else []:
        name, _, value = pair.partition("=")
        query.setdefault(name, []).append(value)  # not url-decoded, as upstream
    return {"headers": headers, "path": target.path or "/", "query_params": query, "addr": addr}
