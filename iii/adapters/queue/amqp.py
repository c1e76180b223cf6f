"""A small AMQP 0-9-1 client on trio: pamqp's frame codec over a trio TCP stream.

Only what the RabbitMQ queue backend needs: one connection with PLAIN auth
and heartbeats, channels, synchronous methods (declare, bind, qos, consume,
get, confirm.select), publishing with **publisher confirms** (many publishes
may await their confirm at once), and consuming with **manual acks**.

Why this and not a ready client: aio-pika/aiormq are asyncio-only; trio-amqp
(2018) and asyncamqp (2023) are unmaintained; a sync client (pika) in worker
threads would need one thread per connection owning every channel, with
every ack and publish marshalled into it and cancellation that cannot reach a
blocked call.  pamqp (maintained; aiormq's codec) does the byte-level work,
so what remains here is the frame loop and the method/reply bookkeeping, in
trio's own terms: cancellable, with timeouts, and tasks owned by a nursery.

Lifetime: :func:`open_amqp_connection` is an async context manager; the
reader and heartbeat tasks live in its nursery.  If the socket fails or the
broker closes the connection, every waiter gets
:class:`~iii.errors.AdapterUnavailableError` and :attr:`AmqpConnection.closed`
is set; the owner opens a new connection.  A channel closed by the broker
(e.g. a declare with conflicting arguments) fails that channel's waiters only.
"""

from __future__ import annotations

import logging
import struct
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from pamqp import commands, frame, header, heartbeat
from pamqp.body import ContentBody
from pamqp.commands import Basic

from iii.errors import AdapterUnavailableError

__all__ = ["AmqpConnection", "AmqpChannel", "AmqpMessage", "open_amqp_connection"]

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct(">BHI")
RPC_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0


@attrs.define(eq=False)
class AmqpMessage:
    """A delivered (or fetched) message: method frame, properties, body."""

    method: Any
    properties: Any
    body: bytes
    channel: AmqpChannel | None = None

    @property
    def delivery_tag(self) -> int:
        return int(self.method.delivery_tag)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {}) if self.properties is not None else {}


@attrs.define(eq=False)
class _Assembly:
    method: Any
    properties: Any = None
    size: int = 0
    parts: list[bytes] = attrs.field(factory=list)


@attrs.define(eq=False)
class AmqpChannel:
    connection: AmqpConnection
    id: int
    closed: str | None = None
    _rpc_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _abandoned: int = 0  # replies still to come for calls that gave up
    _replies: tuple[Any, Any] = attrs.field(factory=lambda: trio.open_memory_channel[Any](16))
    _assembly: _Assembly | None = None
    _consumers: dict[str, trio.MemorySendChannel[AmqpMessage]] = attrs.field(factory=dict)
    _confirming: bool = False
    _publish_seq: int = 0
    _unconfirmed: dict[int, list[Any]] = attrs.field(factory=dict)  # seq -> [event, ok?]

    # -- incoming frames (called by the connection's reader) ------------------------------

    def _on_frame(self, value: Any) -> None:
        if isinstance(value, (Basic.Deliver, Basic.GetOk, Basic.Return)):
            self._assembly = _Assembly(method=value)
            return
        if isinstance(value, header.ContentHeader):
            assert self._assembly is not None
            self._assembly.properties = value.properties
            self._assembly.size = value.body_size
            if value.body_size == 0:
                self._complete()
            return
        if isinstance(value, ContentBody):
            assert self._assembly is not None
            self._assembly.parts.append(value.value)
            if sum(map(len, self._assembly.parts)) >= self._assembly.size:
                self._complete()
            return
        if isinstance(value, (Basic.Ack, Basic.Nack)):
            self._on_confirm(value)
            return
        if isinstance(value, commands.Channel.Close):
            self._fail(f"channel closed by the broker: {value.reply_code} {value.reply_text}")
            self.connection._send_nowait(frame.marshal(commands.Channel.CloseOk(), self.id))
            return
        if isinstance(value, Basic.Cancel):
            send = self._consumers.pop(value.consumer_tag or "", None)
            if send is not None:
                send.close()
            return
        self._replies[0].send_nowait(value)

    def _complete(self) -> None:
        assembly, self._assembly = self._assembly, None
        assert assembly is not None
        message = AmqpMessage(assembly.method, assembly.properties, b"".join(assembly.parts), self)
        if isinstance(assembly.method, Basic.Deliver):
            send = self._consumers.get(assembly.method.consumer_tag or "")
            if send is not None:
                try:
                    send.send_nowait(message)
                except trio.WouldBlock:  # prefetch bounds this; never expected
                    log.error(
                        "AMQP consumer buffer full; message %s requeued", message.delivery_tag
                    )
                    self.nack_nowait(message.delivery_tag, requeue=True)
        elif isinstance(assembly.method, Basic.GetOk):
            self._replies[0].send_nowait(message)

    def _on_confirm(self, value: Any) -> None:
        tags = (
            [t for t in self._unconfirmed if t <= value.delivery_tag]
            if value.multiple
            else [value.delivery_tag]
        )
        for tag in tags:
            waiter = self._unconfirmed.pop(tag, None)
            if waiter is not None:
                waiter[1] = isinstance(value, Basic.Ack)
                waiter[0].set()

    def _fail(self, reason: str) -> None:
        self.closed = reason
        for waiter in self._unconfirmed.values():
            waiter[1] = False
            waiter[0].set()
        self._unconfirmed.clear()
        for send in self._consumers.values():
            send.close()
        self._consumers.clear()
        self._replies[0].close()
        self.connection.channels.pop(self.id, None)

    # -- outgoing ----------------------------------------------------------------------------

    def _check(self) -> None:
        if self.closed is not None:
            raise AdapterUnavailableError(f"AMQP channel {self.id}: {self.closed}")

    async def rpc(self, method: Any, *, timeout: float = RPC_TIMEOUT) -> Any:
        """Send a synchronous method and return the broker's reply.

        Replies come in request order.  A call that gives up (timeout,
        cancellation) after its request went out leaves a reply still to
        come: it is counted in ``_abandoned`` and the next call drops it
        before waiting for its own.
        """
        async with self._rpc_lock:
            self._check()
            waiting = False
            try:
                with trio.fail_after(timeout):
                    while self._abandoned:
                        await self._replies[1].receive()
                        self._abandoned -= 1
                    await self.connection._send(frame.marshal(method, self.id))
                    waiting = True
                    reply = await self._replies[1].receive()
                    waiting = False
                    return reply
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise AdapterUnavailableError(f"AMQP channel {self.id}: {self.closed}") from None
            except trio.TooSlowError:
                raise AdapterUnavailableError(
                    f"AMQP {method.name} got no reply in {timeout:g}s"
                ) from None
            finally:
                if waiting:
                    self._abandoned += 1

    async def confirm_select(self) -> None:
        await self.rpc(commands.Confirm.Select())
        self._confirming = True

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Any,
        *,
        timeout: float = RPC_TIMEOUT,
    ) -> None:
        """Publish; in confirm mode, return once the broker confirmed it (raise if it refused)."""
        self._check()
        frames = [
            frame.marshal(Basic.Publish(exchange=exchange, routing_key=routing_key), self.id),
            frame.marshal(header.ContentHeader(0, len(body), properties), self.id),
        ]
        chunk = self.connection.frame_max - 8
        for start in range(0, len(body), chunk):
            frames.append(frame.marshal(ContentBody(body[start : start + chunk]), self.id))
        waiter: list[Any] | None = None
        if self._confirming:
            self._publish_seq += 1
            seq = self._publish_seq
            waiter = [trio.Event(), False]
            self._unconfirmed[seq] = waiter
        try:
            with trio.fail_after(timeout):
                await self.connection._send(b"".join(frames))
                if waiter is None:
                    return
                await waiter[0].wait()
        except trio.TooSlowError:
            if waiter is not None:
                self._unconfirmed.pop(seq, None)
            raise AdapterUnavailableError(
                f"AMQP publish to {exchange or routing_key} not confirmed in {timeout:g}s"
            ) from None
        if not waiter[1]:
            raise AdapterUnavailableError(
                f"AMQP publish to {exchange or routing_key} refused ({self.closed or 'nack'})"
            )

    async def consume(
        self, queue: str, prefetch: int
    ) -> tuple[str, trio.MemoryReceiveChannel[AmqpMessage]]:
        await self.rpc(Basic.Qos(prefetch_count=prefetch))
        send, receive = trio.open_memory_channel[AmqpMessage](prefetch + 16)
        # Our own tag, registered before asking: a delivery can follow
        # ConsumeOk in the same read, before the caller resumes.
        tag = f"iii-{uuid.uuid4().hex}"
        self._consumers[tag] = send
        try:
            await self.rpc(Basic.Consume(queue=queue, consumer_tag=tag))
        except BaseException:
            self._consumers.pop(tag, None)
            raise
        return tag, receive

    async def get(self, queue: str) -> AmqpMessage | None:
        reply = await self.rpc(Basic.Get(queue=queue))
        return reply if isinstance(reply, AmqpMessage) else None

    def ack_nowait(self, delivery_tag: int) -> None:
        self._check()
        self.connection._send_nowait(frame.marshal(Basic.Ack(delivery_tag=delivery_tag), self.id))

    def nack_nowait(self, delivery_tag: int, *, requeue: bool) -> None:
        self._check()
        self.connection._send_nowait(
            frame.marshal(Basic.Nack(delivery_tag=delivery_tag, requeue=requeue), self.id)
        )

    async def aclose(self) -> None:
        if self.closed is None and not self.connection.closed.is_set():
            with trio.move_on_after(2):
                try:
                    await self.rpc(
                        commands.Channel.Close(
                            reply_code=200, reply_text="bye", class_id=0, method_id=0
                        )
                    )
                except AdapterUnavailableError:
                    pass
        if self.closed is None:
            self._fail("closed")


@attrs.define(eq=False)
class AmqpConnection:
    stream: trio.abc.Stream
    frame_max: int = 131072
    heartbeat: int = 30
    channels: dict[int, AmqpChannel] = attrs.field(factory=dict)
    closed: trio.Event = attrs.field(factory=trio.Event)
    close_reason: str | None = None
    _next_channel: int = 1
    _outbox: tuple[Any, Any] = attrs.field(factory=lambda: trio.open_memory_channel[bytes](10_000))
    _last_received: float = 0.0

    async def _send(self, data: bytes) -> None:
        """Queue frames for the writer; waits while the queue is full (callers bound it)."""
        if self.closed.is_set():
            raise AdapterUnavailableError(f"AMQP connection closed: {self.close_reason}")
        try:
            await self._outbox[0].send(data)
        except trio.ClosedResourceError:  # lost while waiting for room
            raise AdapterUnavailableError(f"AMQP connection closed: {self.close_reason}") from None

    def _send_nowait(self, data: bytes) -> None:
        if self.closed.is_set():
            raise AdapterUnavailableError(f"AMQP connection closed: {self.close_reason}")
        try:
            self._outbox[0].send_nowait(data)
        except trio.WouldBlock:
            raise AdapterUnavailableError("AMQP send queue full") from None

    async def channel(self) -> AmqpChannel:
        if self.closed.is_set():
            raise AdapterUnavailableError(f"AMQP connection closed: {self.close_reason}")
        while self._next_channel in self.channels:
            self._next_channel = self._next_channel % 2047 + 1
        channel = AmqpChannel(self, self._next_channel)
        self.channels[channel.id] = channel
        self._next_channel = self._next_channel % 2047 + 1
        await channel.rpc(commands.Channel.Open())
        return channel

    def _lost(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        # Senders waiting for room in the queue get ClosedResourceError: the
        # writer is gone and will never make room.
        self._outbox[0].close()
        for channel in list(self.channels.values()):
            channel._fail(f"connection lost: {reason}")
        (log.debug if reason == "closed" else log.warning)("AMQP connection lost: %s", reason)

    async def _writer(self) -> None:
        receive = self._outbox[1]
        while True:
            data = await receive.receive()
            batch = [data]
            while True:  # coalesce what is queued into one write
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await self.stream.send_all(b"".join(batch))

    async def _reader(self) -> None:
        buffer = bytearray()
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("the broker closed the socket")
            self._last_received = trio.current_time()
            buffer += data
            while len(buffer) >= FRAME_HEADER.size:
                _, _, size = FRAME_HEADER.unpack_from(buffer)
                total = FRAME_HEADER.size + size + 1
                if len(buffer) < total:
                    break
                _, channel_id, value = frame.unmarshal(bytes(buffer[:total]))
                del buffer[:total]
                self._dispatch(channel_id, value)

    def _dispatch(self, channel_id: int, value: Any) -> None:
        if isinstance(value, heartbeat.Heartbeat):
            return
        if channel_id == 0:
            if isinstance(value, commands.Connection.Close):
                self._send_nowait(frame.marshal(commands.Connection.CloseOk(), 0))
                raise ConnectionError(
                    f"closed by the broker: {value.reply_code} {value.reply_text}"
                )
            if isinstance(value, commands.Connection.CloseOk):
                raise ConnectionError("closed")
            if isinstance(value, commands.Connection.Blocked):
                log.warning("RabbitMQ blocked this connection: %s", value.reason)
            return
        channel = self.channels.get(channel_id)
        if channel is not None:
            channel._on_frame(value)

    async def _heartbeat(self) -> None:
        beat = frame.marshal(heartbeat.Heartbeat(), 0)
        while True:
            await trio.sleep(self.heartbeat / 2)
            if trio.current_time() - self._last_received > self.heartbeat * 2:
                raise ConnectionError("missed heartbeats from the broker")
            self._send_nowait(beat)

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as io_nursery:
                io_nursery.start_soon(self._reader)
                io_nursery.start_soon(self._writer)
                if self.heartbeat:
                    io_nursery.start_soon(self._heartbeat)
                task_status.started()
        except* (
            OSError,
            ConnectionError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            AdapterUnavailableError,
        ) as group:
            self._lost(str(group.exceptions[0]))
        except* Exception as group:  # a codec error: the stream cannot be trusted any more
            self._lost(f"protocol error: {group.exceptions[0]!r}")
        finally:
            self._lost("closed")


async def _read_method(stream: trio.abc.Stream, buffer: bytearray) -> Any:
    while True:
        if len(buffer) >= FRAME_HEADER.size:
            _, _, size = FRAME_HEADER.unpack_from(buffer)
            total = FRAME_HEADER.size + size + 1
            if len(buffer) >= total:
                _, _, value = frame.unmarshal(bytes(buffer[:total]))
                del buffer[:total]
                return value
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError(
                "the broker closed the socket during the handshake (bad credentials or vhost?)"
            )
        buffer += data


@asynccontextmanager
async def open_amqp_connection(url: str, *, heartbeat_s: int = 30) -> AsyncIterator[AmqpConnection]:
    """Connect, authenticate (PLAIN) and open the vhost of an ``amqp://`` URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "amqp":
        raise AdapterUnavailableError(f"only amqp:// URLs are supported, got {parts.scheme!r}")
    host = parts.hostname or "localhost"
    port = parts.port or 5672
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
            buffer = bytearray()
            await stream.send_all(frame.marshal(header.ProtocolHeader(), 0))
            start = await _read_method(stream, buffer)
            if not isinstance(start, commands.Connection.Start):
                raise ConnectionError(f"unexpected {type(start).__name__} during the handshake")
            await stream.send_all(
                frame.marshal(
                    commands.Connection.StartOk(
                        client_properties={
                            "product": "iii",
                            "capabilities": {
                                "publisher_confirms": True,
                                "basic.nack": True,
                                "consumer_cancel_notify": True,
                            },
                        },
                        mechanism="PLAIN",
                        response=f"\0{user}\0{password}",
                    ),
                    0,
                )
            )
            tune = await _read_method(stream, buffer)
            if not isinstance(tune, commands.Connection.Tune):
                raise ConnectionError(f"authentication failed ({type(tune).__name__})")
            frame_max = min(tune.frame_max or 131072, 131072)
            beat = min(tune.heartbeat, heartbeat_s) if tune.heartbeat else heartbeat_s
            await stream.send_all(
                frame.marshal(
                    commands.Connection.TuneOk(
                        channel_max=2047, frame_max=frame_max, heartbeat=beat
                    ),
                    0,
                )
                + frame.marshal(commands.Connection.Open(virtual_host=vhost), 0)
            )
            opened = await _read_method(stream, buffer)
            if not isinstance(opened, commands.Connection.OpenOk):
                raise ConnectionError(
                    f"cannot open vhost {vhost!r}: {getattr(opened, 'reply_text', opened)}"
                )
    except (OSError, ConnectionError, trio.TooSlowError) as exc:
        raise AdapterUnavailableError(
            f"cannot connect to RabbitMQ at {host}:{port}: {exc or type(exc).__name__}"
        ) from exc
    connection = AmqpConnection(stream=stream, frame_max=frame_max, heartbeat=beat)
    connection._last_received = trio.current_time()
    async with trio.open_nursery() as connection_nursery:
        await connection_nursery.start(connection._serve)
        try:
            yield connection
        finally:
            try:
                if not connection.closed.is_set():
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        close = commands.Connection.Close(
                            reply_code=200, reply_text="bye", class_id=0, method_id=0
                        )
                        try:
                            await connection._send(frame.marshal(close, 0))
                            await connection.closed.wait()
                        except AdapterUnavailableError:
                            pass
            finally:
                connection_nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await stream.aclose()
