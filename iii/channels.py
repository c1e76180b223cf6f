"""Streaming channels: ordered text/binary frames from one party to another.

A channel is created by ``engine::channels::create`` (no owner) or by the
engine itself (the REST module streams request and response bodies through
them).  Each side is claimed once, either by a WebSocket on
``/ws/channels/{id}?key=…&dir=read|write`` (served by :mod:`iii.channel_conn`)
or by engine code through :meth:`Channel.claim_writer` /
:meth:`Channel.claim_reader`.

Frames go through a :class:`~iii.channel_buffer.FrameBuffer` bounded in
frames (``buffer_size``) and in bytes (``channel_buffer_bytes``, and
``channels_max_bytes`` for all channels together), so a fast writer waits
for a slow reader (backpressure), and frames plus the end-of-stream that a
writer sends before the reader attaches are kept until it does (spec
protocol.md §10.1), within those bounds.  Channels created by workers
(``engine::channels::create``) are limited in number (``max_channels``); the
engine's own (the REST module's, two per request) are bounded by the REST
module's ``concurrency_request_limit`` instead.

Lifetime: a channel whose both sides are finished is removed at once
(:meth:`ChannelTable.release_if_finished`, called when a socket leaves it);
:meth:`ChannelTable.sweep` (run every 60 s by the engine) removes channels
older than 5 minutes that still have an unclaimed side, and any finished one
left.  A writer that finished before any reader came keeps its frames for
that reader until the 5 minutes are over, as upstream does: they are bounded
in bytes, and a shorter time once the writer is gone would not bound an
attacker (who keeps the writer open instead) but would lose data of a slow,
legitimate reader.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.channel_buffer import ByteBudget, Frame, FrameBuffer, FrameReader, FrameWriter
from iii.errors import IIIError

if TYPE_CHECKING:
    from iii.config_schema import EngineConfig

__all__ = [
    "Channel",
    "ChannelTable",
    "ChannelClaimedError",
    "TooManyChannelsError",
    "Frame",
    "random_uuid",
]

DEFAULT_BUFFER = 64
MAX_BUFFER = 1024
UNCLAIMED_TTL = 300.0
MiB = 1024 * 1024
# The engine config's defaults (EngineConfig: channel_buffer_bytes, ...).
DEFAULT_CHANNEL_BYTES = 4 * MiB
DEFAULT_TOTAL_BYTES = 256 * MiB
DEFAULT_MAX_CHANNELS = 10_000


class ChannelClaimedError(Exception):
    """That side of the channel already has a party."""


class TooManyChannelsError(IIIError):
    """``engine::channels::create`` past ``max_channels``."""

    code = "too_many_channels"


_entropy = bytearray()


def random_uuid() -> str:
    """A random (version 4) UUID from the OS's CSPRNG, drawn in bulk.

    The REST module creates two channels and an invocation id per HTTP
    request; one ``os.urandom`` system call per 256 ids instead of one each.
    The bytes are as unpredictable as ``secrets.token_bytes`` (same source),
    which access keys need.
    """
    raw = _random_bytes16()
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def random_key() -> str:
    """32 random hex digits (128 bits) from the same pool as :func:`random_uuid`."""
    return _random_bytes16().hex()


def _random_bytes16() -> bytearray:
    if len(_entropy) < 16:
        _entropy.extend(os.urandom(4096))
    raw = _entropy[:16]
    del _entropy[:16]
    return raw


def _clamp_buffer(buffer_size: Any) -> int:
    if not isinstance(buffer_size, int) or isinstance(buffer_size, bool):
        return DEFAULT_BUFFER
    return max(1, min(MAX_BUFFER, buffer_size))


@attrs.define(eq=False)
class Channel:
    channel_id: str
    access_key: str
    buffer_size: int
    created_at: float
    owner: str | None = None
    max_bytes: int = DEFAULT_CHANNEL_BYTES
    budget: ByteBudget = attrs.field(factory=lambda: ByteBudget(DEFAULT_TOTAL_BYTES))
    # Created by a worker (engine::channels::create): counts in max_channels.
    by_worker: bool = False
    # The frame buffer, made on first use: a channel nobody opens (the REST
    # module's channels of a request whose function just returns) costs none.
    _buffer: FrameBuffer | None = None
    writer_claimed: bool = False
    reader_claimed: bool = False
    writer_done: bool = False
    reader_done: bool = False
    # Scopes of the sockets attached to this channel: cancelled when it is
    # removed, so a socket never outlives its channel.
    socket_scopes: list[trio.CancelScope] = attrs.field(factory=list)
    # Called with "write" or "read" when a side is claimed (by a socket or by
    # engine code), so the creator can start serving that side only once
    # somebody uses it (the REST module starts no task for unused channels).
    on_claim: Callable[[str], None] | None = None

    def _frames(self) -> FrameBuffer:
        if self._buffer is None:
            self._buffer = FrameBuffer(
                max_frames=self.buffer_size, max_bytes=self.max_bytes, budget=self.budget
            )
        return self._buffer

    @property
    def send_side(self) -> FrameWriter:
        return self._frames().writer

    @property
    def receive_side(self) -> FrameReader:
        return self._frames().reader

    @property
    def buffered_bytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.buffered_bytes

    def reserve(self, direction: str) -> None:
        """Mark one side as the creator's without opening it yet.

        No socket can claim it afterwards; the creator takes its end later
        through :attr:`send_side` / :attr:`receive_side`, when the other side
        is claimed (``on_claim``).  Reserving does not call ``on_claim``.
        """
        if direction == "write":
            self.writer_claimed = True
        else:
            self.reader_claimed = True

    def ref(self, direction: str) -> dict[str, str]:
        """The ``StreamChannelRef`` a worker uses to connect to one side."""
        return {
            "channel_id": self.channel_id,
            "access_key": self.access_key,
            "direction": direction,
        }

    def claim_writer(self) -> FrameWriter:
        if self.writer_claimed:
            raise ChannelClaimedError(self.channel_id)
        self.writer_claimed = True
        if self.on_claim is not None:
            self.on_claim("write")
        return self.send_side

    def claim_reader(self) -> FrameReader:
        if self.reader_claimed:
            raise ChannelClaimedError(self.channel_id)
        self.reader_claimed = True
        if self.on_claim is not None:
            self.on_claim("read")
        return self.receive_side

    def close(self) -> None:
        """End both sides at once (the channel is being removed); frees its frames."""
        if self._buffer is not None:
            self._buffer.close_writer()
            self._buffer.close_reader()
        self.writer_done = self.reader_done = True
        for scope in self.socket_scopes:
            scope.cancel()

    @property
    def finished(self) -> bool:
        return self.writer_done and self.reader_done


@attrs.define(eq=False)
class ChannelTable:
    channel_buffer_bytes: int = DEFAULT_CHANNEL_BYTES
    channels_max_bytes: int = DEFAULT_TOTAL_BYTES
    max_channels: int = DEFAULT_MAX_CHANNELS
    channels: dict[str, Channel] = attrs.field(factory=dict)
    budget: ByteBudget = attrs.field(
        default=attrs.Factory(lambda self: ByteBudget(self.channels_max_bytes), takes_self=True)
    )
    # Open channels created by workers (checked against max_channels).
    worker_channels: int = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> ChannelTable:
        return cls(
            channel_buffer_bytes=config.channel_buffer_bytes,
            channels_max_bytes=config.channels_max_bytes,
            max_channels=config.max_channels,
        )

    def __len__(self) -> int:
        return len(self.channels)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of frames buffered by all channels together."""
        return self.budget.used

    def create(self, buffer_size: Any = None, *, owner: str | None = None) -> Channel:
        """A channel for the engine's own use (not counted in ``max_channels``)."""
        channel = Channel(
            channel_id=random_uuid(),
            access_key=random_key(),
            buffer_size=_clamp_buffer(buffer_size),
            created_at=trio.current_time(),
            owner=owner,
            max_bytes=self.channel_buffer_bytes,
            budget=self.budget,
        )
        self.channels[channel.channel_id] = channel
        return channel

    def create_for_worker(self, buffer_size: Any) -> Channel:
        """A channel asked for by ``engine::channels::create``: at most ``max_channels`` open."""
        if self.worker_channels >= self.max_channels:
            raise TooManyChannelsError(
                f"{self.worker_channels} channels are open, the engine's max_channels; "
                "a channel is freed when both its sides have finished, or 5 minutes "
                "after its creation if a side never connected"
            )
        channel = self.create(buffer_size)
        channel.by_worker = True
        self.worker_channels += 1
        return channel

    def lookup(self, channel_id: str, access_key: str) -> Channel | None:
        channel = self.channels.get(channel_id)
        if channel is None or not secrets.compare_digest(channel.access_key, access_key):
            return None
        return channel

    def remove(self, channel: Channel) -> None:
        if self.channels.get(channel.channel_id) is channel:
            del self.channels[channel.channel_id]
            if channel.by_worker:
                self.worker_channels -= 1
        channel.close()

    def release_if_finished(self, channel: Channel) -> None:
        """Remove a channel whose both sides have finished (a socket just left it)."""
        if channel.finished:
            self.remove(channel)

    def remove_owned_by(self, owner: str) -> int:
        owned = [c for c in self.channels.values() if c.owner == owner]
        for channel in owned:
            self.remove(channel)
        return len(owned)

    def sweep(self, now: float, ttl: float = UNCLAIMED_TTL) -> int:
        stale = [
            c
            for c in self.channels.values()
            if c.finished
            or (now - c.created_at > ttl and not (c.writer_claimed and c.reader_claimed))
        ]
        for channel in stale:
            self.remove(channel)
        return len(stale)
