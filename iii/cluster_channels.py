"""Streaming channels across engines: the channel refs of forwarded calls, bridged.

A channel lives on the engine that created it: the REST module makes two per
HTTP request (``request_body`` and ``response``), and a worker makes its own
with ``engine::channels::create``.  A ref (``{"channel_id", "access_key",
"direction"}``, other keys kept, as the SDKs read it) names a channel of one
engine only; a worker on another engine that opens it would find nothing.  So
wherever a value crosses from one engine to another inside the cluster, the
engine that receives it replaces every channel ref in it, at any depth of
objects and arrays (the SDKs resolve refs at any depth), by a ref to a local
channel of its own, and pumps frames between the two:

* a forwarded call's *data*, on the engine that runs it (it came over a
  peer's link, :data:`~iii.grants.CLUSTER_PEER`):
  :func:`bridged_channel_refs`; a local channel the worker did not open by
  the time the call ends is removed then;
* a forwarded call's *result*, on the engine that forwarded it
  (:meth:`iii.cluster.peers.Peer.forward`): :func:`bridge_result_refs`; the
  caller opens those after the call, so they live until opened, until the
  calling worker disconnects, or for :data:`~iii.channels.UNCLAIMED_TTL`
  (the sweep), and count in ``max_channels`` as the caller's own would.

A ref to one of the receiving engine's own channels is left as it is, and a
function that returns a ref of its data without opening it returns the
caller's own ref (:meth:`BridgedValue.restore`): a channel passed to a
function on another engine and handed back is the caller's channel again.

Each bridged channel, by the direction of the ref:

* ``read`` ref (the receiver reads): a socket to the peer's
  ``/ws/channels/{id}?dir=read`` feeds the local channel's writer;
* ``write`` ref (the receiver writes): the local channel's reader feeds a
  socket to the peer's ``dir=write``.

A pump starts only when somebody opens the local end (``Channel.on_claim``):
a ref never opened leaves the peer's channel untouched, as on one engine.
Frames keep their type (text or binary) and order; the end of the stream is
passed on; a side that ends (or cannot connect) closes the other.  The
bounds are those of any channel: the local one buffers at most
``channel_buffer_bytes`` (and counts in ``channels_max_bytes``), each pump
lives at most :data:`BRIDGE_TTL`, its socket's frames are limited by the
engine's ``max_message_size``, and one value may hold at most
:data:`MAX_BRIDGED_REFS` refs (more: ``too_many_channels``).  A pump only
ever connects to the peer's advertised URL (from the membership), never to
an address found in the value.

Outside the :mod:`iii.cluster` package on purpose: the worker-call path
(:mod:`iii.worker_calls`) imports it, and the package's ``__init__`` imports
the listener, which imports that path.

Lifetime: each pump is a detached, contained task of the engine
(:meth:`~iii.engine.Engine.spawn_detached`); it ends with its stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from iii.channel_buffer import FrameReader, FrameWriter
from iii.channels import UNCLAIMED_TTL, Channel, TooManyChannelsError
from iii.client import CLOSE_TIMEOUT, Endpoint, _open_stream, _UpgradeGuard
from iii.wsconnection import open_client_connection

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = [
    "MAX_BRIDGED_REFS",
    "BridgedValue",
    "bridge_result_refs",
    "bridged_channel_refs",
    "has_channel_refs",
    "is_channel_ref",
]

log = logging.getLogger(__name__)

BRIDGE_TTL = UNCLAIMED_TTL
CONNECT_TIMEOUT = 10.0
# The most channel refs one value (a call's data, a result) may hold.
MAX_BRIDGED_REFS = 64


def is_channel_ref(value: Any) -> bool:
    """A channel ref as the SDKs recognise one (other keys allowed), of sane length."""
    if type(value) is not dict:
        return False
    channel_id = value.get("channel_id")
    access_key = value.get("access_key")
    return (
        type(channel_id) is str
        and type(access_key) is str
        and value.get("direction") in ("read", "write")
        and 0 < len(channel_id) <= 128
        and 0 < len(access_key) <= 256
    )


def has_channel_refs(data: Any) -> bool:
    """Does ``data`` hold a channel ref at any depth?

    On every call between engines, so cheap: a value with no ``"access_key"``
    key anywhere is cleared by one C-speed encode and search (a walk in
    Python costs about 1 us per object); only one with such a key is walked.
    """
    kind = type(data)
    if kind is not dict and kind is not list:
        return False
    try:
        if b'"access_key"' not in orjson.dumps(data):
            return False
    except orjson.JSONEncodeError:  # not from the wire: walk it
        pass
    return _walk_for_refs(data)


def _walk_for_refs(data: Any) -> bool:
    """(Depth is bounded by :data:`iii.json_limits.MAX_DEPTH` for anything read from a peer.)"""
    kind = type(data)
    if kind is dict:
        if "access_key" in data and is_channel_ref(data):
            return True
        values = data.values()
    elif kind is list:
        values = data
    else:
        return False
    for value in values:
        kind = type(value)
        if (kind is dict or kind is list) and _walk_for_refs(value):
            return True
    return False


def _replace_refs(data: Any, replace: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """``data`` with every channel ref replaced by ``replace(ref)``; the
    containers on the way to a ref are copied, the rest is shared."""
    if type(data) is dict:
        if "access_key" in data and is_channel_ref(data):
            return replace(data)
        copied: dict[str, Any] | None = None
        for key, value in data.items():
            kind = type(value)
            if kind is dict or kind is list:
                new = _replace_refs(value, replace)
                if new is not value:
                    if copied is None:
                        copied = dict(data)
                    copied[key] = new
        return data if copied is None else copied
    if type(data) is list:
        items: list[Any] | None = None
        for index, value in enumerate(data):
            kind = type(value)
            if kind is dict or kind is list:
                new = _replace_refs(value, replace)
                if new is not value:
                    if items is None:
                        items = list(data)
                    items[index] = new
        return data if items is None else items
    return data


def _bridge_all(
    engine: Engine, peer_url: str, data: Any, create: Callable[[], Channel]
) -> tuple[Any, dict[Channel, dict[str, Any]]]:
    """``data`` with its refs bridged to ``peer_url`` through channels made by
    ``create`` (returned with the ref each stands for); at most
    :data:`MAX_BRIDGED_REFS` (else nothing is left made)."""
    created: dict[Channel, dict[str, Any]] = {}

    table = engine.channels

    def replace(ref: dict[str, Any]) -> dict[str, Any]:
        if table.lookup(ref["channel_id"], ref["access_key"]) is not None:
            return ref  # one of this engine's own, handed back: as it is
        if len(created) >= MAX_BRIDGED_REFS:
            raise TooManyChannelsError(
                f"a value sent between engines holds more than {MAX_BRIDGED_REFS} channel refs"
            )
        local = _bridge(engine, peer_url, ref, create())
        created[local] = ref
        return {**ref, **local.ref(ref["direction"])}

    try:
        return _replace_refs(data, replace), created
    except BaseException:
        for local in created:
            engine.channels.remove(local)
        raise


@attrs.define(eq=False)
class BridgedValue:
    """A forwarded call's data with its refs bridged (:attr:`data`), and what
    they stood for, to hand back a ref the function returns unopened."""

    engine: Engine
    data: Any
    # local channel id -> the ref it stands for (the peer's)
    originals: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def restore(self, result: Any) -> Any:
        """``result`` with each bridged ref the function returns without
        having opened it replaced by the peer's own (which the peer keeps as
        it is): a function may pass a channel on, as on one engine."""
        if not self.originals or not has_channel_refs(result):
            return result
        table = self.engine.channels

        def replace(ref: dict[str, Any]) -> dict[str, Any]:
            original = self.originals.get(ref["channel_id"])
            local = table.lookup(ref["channel_id"], ref["access_key"])
            if original is None or local is None or local.on_claim is None:
                return ref  # not ours, or opened: the peer bridges it back
            return original

        return _replace_refs(result, replace)


@contextmanager
def bridged_channel_refs(engine: Engine, peer_url: str, data: Any) -> Iterator[BridgedValue]:
    """A forwarded call's ``data`` with its channel refs replaced by local,
    bridged ones, for the duration of the call: a local channel the worker
    did not open by the time the call ends is removed then."""
    if not has_channel_refs(data):
        yield BridgedValue(engine, data)
        return
    bridged, created = _bridge_all(engine, peer_url, data, engine.channels.create)
    try:
        yield BridgedValue(
            engine, bridged, {local.channel_id: ref for local, ref in created.items()}
        )
    finally:
        for local in created:
            if local.on_claim is not None:  # never opened
                engine.channels.remove(local)


def bridge_result_refs(engine: Engine, peer_url: str, result: Any, *, owner: str | None) -> Any:
    """A forwarded call's ``result`` with its channel refs replaced by local,
    bridged ones, which the caller opens after the call: owned by the
    calling worker (``owner``; removed when it disconnects) and counted in
    ``max_channels`` (:class:`~iii.channels.TooManyChannelsError` past it)."""
    if not has_channel_refs(result):
        return result
    table = engine.channels

    def create() -> Channel:
        channel = table.create_for_worker(None)
        channel.owner = owner
        return channel

    bridged, _ = _bridge_all(engine, peer_url, result, create)
    return bridged


def _bridge(engine: Engine, peer_url: str, ref: dict[str, Any], local: Channel) -> Channel:
    """``local`` made to stand for the peer's channel: our end is reserved, and
    the pump starts only when somebody opens the other end (a ref never
    opened leaves the peer's channel untouched, as on one engine)."""
    local.reserve("write" if ref["direction"] == "read" else "read")

    def on_claim(direction: str) -> None:
        local.on_claim = None
        what = f"channel bridge ({direction}) to {peer_url}"
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
    engine: Engine, peer_url: str, ref: dict[str, Any]
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
    engine: Engine, peer_url: str, ref: dict[str, Any], local: Channel, writer: FrameWriter
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
    engine: Engine, peer_url: str, ref: dict[str, Any], local: Channel, reader: FrameReader
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
