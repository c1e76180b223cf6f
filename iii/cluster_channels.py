"""Streaming channels across engines: the channel refs of a forwarded call, bridged.

A channel lives on the engine that created it (the REST module makes two per
HTTP request: ``request_body`` and ``response``).  When such a call is
forwarded to the peer whose worker runs the function, the worker would open
the refs on *its* engine, which does not know them.  So the engine that
receives a forwarded call (over a peer's link, :data:`~iii.grants.CLUSTER_PEER`)
replaces every top-level channel ref in the call's data by a ref to a local
channel of its own, and pumps frames between the two:

* ``read`` ref (the worker reads, e.g. a request body): a socket to the
  peer's ``/ws/channels/{id}?dir=read`` feeds the local channel's writer;
* ``write`` ref (the worker writes, e.g. a streamed response): the local
  channel's reader feeds a socket to the peer's ``dir=write``.

A pump starts only when the worker opens its end (``Channel.on_claim``): a
function that never opens a ref leaves the peer's channel untouched, so the
peer answers with the function's value as it would on one engine.  Frames
keep their type (text or binary) and order; the end of the stream is
passed on; a side that ends (or cannot connect) closes the other.  Each pump
is bounded by :data:`BRIDGE_TTL` (the time an unclaimed channel lives) and
its socket's frames by the engine's ``max_message_size``.

Outside the :mod:`iii.cluster` package on purpose: the worker-call path
(:mod:`iii.worker_calls`) imports it, and the package's ``__init__`` imports
the listener, which imports that path.

Lifetime: each pump is a detached, contained task of the engine
(:meth:`~iii.engine.Engine.spawn_detached`); it ends with its stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.channel_buffer import FrameReader, FrameWriter
from iii.channels import UNCLAIMED_TTL, Channel
from iii.client import CLOSE_TIMEOUT, Endpoint, _open_stream, _UpgradeGuard
from iii.wsconnection import open_client_connection

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["bridged_channel_refs", "has_channel_refs", "is_channel_ref"]

log = logging.getLogger(__name__)

BRIDGE_TTL = UNCLAIMED_TTL
CONNECT_TIMEOUT = 10.0


def is_channel_ref(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"channel_id", "access_key", "direction"}
        and value["direction"] in ("read", "write")
        and isinstance(value["channel_id"], str)
        and isinstance(value["access_key"], str)
        and 0 < len(value["channel_id"]) <= 128
        and 0 < len(value["access_key"]) <= 256
    )


def has_channel_refs(data: Any) -> bool:
    """Does a call's data hold a top-level channel ref (:func:`bridged_channel_refs`)?"""
    return isinstance(data, dict) and any(is_channel_ref(v) for v in data.values())


@contextmanager
def bridged_channel_refs(engine: Engine, peer_url: str, data: Any) -> Iterator[Any]:
    """``data`` with its top-level channel refs replaced by local, bridged ones,
    for the duration of the call: a local channel the worker did not open by
    the time the call ends is removed then."""
    if not has_channel_refs(data):
        yield data
        return
    bridged = dict(data)
    created: list[Channel] = []
    for key, ref in data.items():
        if is_channel_ref(ref):
            local = _bridge(engine, peer_url, key, ref)
            created.append(local)
            bridged[key] = local.ref(ref["direction"])
    try:
        yield bridged
    finally:
        for local in created:
            if local.on_claim is not None:  # never opened
                engine.channels.remove(local)


def _bridge(engine: Engine, peer_url: str, key: str, ref: dict[str, str]) -> Channel:
    """A local channel standing for the peer's: our end is reserved, and the
    pump starts only when the worker opens its end (a function that never
    opens it leaves the peer's channel untouched, as on one engine)."""
    local = engine.channels.create()
    local.reserve("write" if ref["direction"] == "read" else "read")

    def on_claim(direction: str) -> None:
        local.on_claim = None
        what = f"channel bridge {key} ({direction}) to {peer_url}"
        if ref["direction"] == "read":
            engine.spawn_detached(_pull, engine, peer_url, ref, local, local.send_side, what=what)
        else:
            engine.spawn_detached(
                _push, engine, peer_url, ref, local, local.receive_side, what=what
            )

    local.on_claim = on_claim
    return local


@asynccontextmanager
async def _open_side(
    engine: Engine, peer_url: str, ref: dict[str, str]
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to one side of the peer's channel, through :mod:`iii.client`'s
    connection code (TLS, the guarded upgrade); closed, then the socket, on exit."""
    endpoint = Endpoint.parse(peer_url)
    resource = (
        f"/ws/channels/{quote(ref['channel_id'], safe='')}"
        f"?key={quote(ref['access_key'], safe='')}&dir={ref['direction']}"
    )
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await _open_stream(endpoint)
    try:
        async with trio.open_nursery() as side_nursery:
            guard = _UpgradeGuard(stream)
            with trio.fail_after(CONNECT_TIMEOUT):
                ws = await open_client_connection(
                    side_nursery,
                    guard,
                    endpoint.host_header,
                    resource,
                    max_message_size=engine.config.max_message_size,
                )
            guard.upgraded()
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose()
                side_nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _pull(
    engine: Engine, peer_url: str, ref: dict[str, str], local: Channel, writer: FrameWriter
) -> None:
    """Peer channel (we read) -> local channel (the worker reads)."""
    try:
        with trio.move_on_after(BRIDGE_TTL):
            async with _open_side(engine, peer_url, ref) as ws:
                while True:
                    try:
                        frame = await ws.get_message()
                    except ConnectionClosed:
                        return
                    try:
                        await writer.send(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # the local reader left
    except Exception as exc:  # unreachable, refused, TLS ...: this stream only
        log.info("channel bridge to %s: %s", peer_url, exc)
    finally:
        writer.close()
        local.writer_done = True
        engine.channels.release_if_finished(local)


async def _push(
    engine: Engine, peer_url: str, ref: dict[str, str], local: Channel, reader: FrameReader
) -> None:
    """Local channel (the worker writes) -> peer channel (we write)."""
    try:
        with trio.move_on_after(BRIDGE_TTL):
            async with _open_side(engine, peer_url, ref) as ws:
                try:
                    async for frame in reader:
                        await ws.send_message(frame)
                except (trio.ClosedResourceError, ConnectionClosed):
                    return
    except Exception as exc:  # unreachable, refused, TLS ...: this stream only
        log.info("channel bridge to %s: %s", peer_url, exc)
    finally:
        reader.close()
        local.reader_done = True
        engine.channels.release_if_finished(local)
