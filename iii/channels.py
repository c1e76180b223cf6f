"""Streaming channels: ordered text/binary frames from one party to another.

A channel is created by ``engine::channels::create`` (no owner) or by the
engine itself (the REST module streams request and response bodies through
them).  Each side is claimed once, either by a WebSocket on
``/ws/channels/{id}?key=…&dir=read|write`` (served by :mod:`iii.channel_conn`)
or by engine code through :meth:`Channel.claim_writer` /
:meth:`Channel.claim_reader`.

Frames go through a bounded trio memory channel of ``buffer_size`` frames, so
a fast writer waits for a slow reader (backpressure), and frames plus the
end-of-stream that a writer sends before the reader attaches are kept until
it does (spec protocol.md §10.1).

Lifetime: :meth:`ChannelTable.sweep` (run every 60 s by the engine) removes
channels older than 5 minutes that still have an unclaimed side, and channels
whose both sides are finished (upstream never frees those).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

import attrs
import trio

__all__ = ["Channel", "ChannelTable", "ChannelClaimedError", "Frame", "random_uuid"]

Frame = str | bytes

DEFAULT_BUFFER = 64
MAX_BUFFER = 1024
UNCLAIMED_TTL = 300.0


class ChannelClaimedError(Exception):
    """That side of the channel already has a party."""


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
    # The frame buffer, made on first use: a channel nobody opens (the REST
    # module's channels of a request whose function just returns) costs none.
    _pair: tuple[trio.MemorySendChannel[Frame], trio.MemoryReceiveChannel[Frame]] | None = None
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

    def _frames(self) -> tuple[trio.MemorySendChannel[Frame], trio.MemoryReceiveChannel[Frame]]:
        if self._pair is None:
            self._pair = trio.open_memory_channel[Frame](self.buffer_size)
        return self._pair

    @property
    def send_side(self) -> trio.MemorySendChannel[Frame]:
        return self._frames()[0]

    @property
    def receive_side(self) -> trio.MemoryReceiveChannel[Frame]:
        return self._frames()[1]

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
        return {"channel_id": self.channel_id, "access_key": self.access_key, "direction": direction}

    def claim_writer(self) -> trio.MemorySendChannel[Frame]:
        if self.writer_claimed:
            raise ChannelClaimedError(self.channel_id)
        self.writer_claimed = True
        if self.on_claim is not None:
            self.on_claim("write")
        return self.send_side

    def claim_reader(self) -> trio.MemoryReceiveChannel[Frame]:
        if self.reader_claimed:
            raise ChannelClaimedError(self.channel_id)
        self.reader_claimed = True
        if self.on_claim is not None:
            self.on_claim("read")
        return self.receive_side

    def close(self) -> None:
        """End both sides at once (the channel is being removed)."""
        if self._pair is not None:
            self._pair[0].close()
            self._pair[1].close()
        self.writer_done = self.reader_done = True
        for scope in self.socket_scopes:
            scope.cancel()

    @property
    def finished(self) -> bool:
        return self.writer_done and self.reader_done


@attrs.define(eq=False)
class ChannelTable:
    channels: dict[str, Channel] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self.channels)

    def create(self, buffer_size: Any = None, *, owner: str | None = None) -> Channel:
        channel = Channel(
            channel_id=random_uuid(),
            access_key=random_key(),
            buffer_size=_clamp_buffer(buffer_size),
            created_at=trio.current_time(),
            owner=owner,
        )
        self.channels[channel.channel_id] = channel
        return channel

    def lookup(self, channel_id: str, access_key: str) -> Channel | None:
        channel = self.channels.get(channel_id)
        if channel is None or not secrets.compare_digest(channel.access_key, access_key):
            return None
        return channel

    def remove(self, channel: Channel) -> None:
        if self.channels.get(channel.channel_id) is channel:
            del self.channels[channel.channel_id]
        channel.close()

    def remove_owned_by(self, owner: str) -> int:
        owned = [c for c in self.channels.values() if c.owner == owner]
        for channel in owned:
            self.remove(channel)
        return len(owned)

    def sweep(self, now: float, ttl: float = UNCLAIMED_TTL) -> int:
        stale = [
            c
            for c in self.channels.values()
            if c.finished or (now - c.created_at > ttl and not (c.writer_claimed and c.reader_claimed))
        ]
        for channel in stale:
            self.remove(channel)
        return len(stale)
