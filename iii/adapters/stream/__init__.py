"""Stream adapters: where ``stream::*`` keeps ``stream -> group -> item -> value``.

:class:`StreamAdapter` is what the stream module needs; :func:`open_stream_adapter`
maps upstream's class names (spec modules.md §4.4) to a backend here:

===========================================  =========================================
``modules::stream::adapters::KvStore``       :mod:`.embedded` (default, or ``embedded``):
                                             the embedded store, in memory or on disk
``modules::stream::adapters::RedisAdapter``  :mod:`.redis` (``redis_url``)
``modules::stream::adapters::Bridge``        :mod:`.bridge` (``bridge_url``): the data
                                             stays in another iii engine, reached
                                             over a supervised link; ``stream::*``
                                             there, or ``kv_server::*`` with
                                             ``remote: kv_server``
===========================================  =========================================

Events between engines: :meth:`StreamAdapter.publish_event` sends a stream
message (the wrapper the clients get) to the other engines sharing the
backend, and ``on_peer_event`` receives theirs; the embedded backend serves
one engine and does neither.  The Bridge does both through the remote
engine's PubSub topic ``stream.events``, as upstream.

Lifetime: :func:`open_stream_adapter` returns the backend's context manager;
the module keeps it open for its whole run.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from iii.adapters import Backend, adapter_kind, backend, open_backend
from iii.adapters.settings import BridgeSettings, RedisSettings
from iii.adapters.stream import embedded
from iii.adapters.stream.base import PeerEventHandler, StreamAdapter
from iii.config_schema import AdapterRef

__all__ = [
    "StreamAdapter",
    "StreamAdapterRef",
    "PeerEventHandler",
    "open_stream_adapter",
    "BACKENDS",
    "DEFAULT_CLASS",
]

DEFAULT_CLASS = "modules::stream::adapters::KvStore"


# The embedded backend is imported with the package; the others only when a
# config chooses them (their config classes live apart, in iii.adapters.settings
# or the queue's base.py, so loading a config does not import them).  Each
# opener is typed: mypy holds the backend's factory to its config class and
# what it yields to the Protocol.
def _open_redis(
    config: RedisSettings, hooks: PeerEventHandler
) -> AbstractAsyncContextManager[StreamAdapter]:
    from iii.adapters.stream import redis

    return redis.open_adapter(config, hooks)


def _open_bridge(
    config: BridgeSettings, hooks: PeerEventHandler
) -> AbstractAsyncContextManager[StreamAdapter]:
    from iii.adapters.stream import bridge

    return bridge.open_adapter(config, hooks)


BACKENDS: dict[str, Backend[Any, PeerEventHandler, StreamAdapter]] = {
    DEFAULT_CLASS: backend(embedded.Config, embedded.open_adapter),
    "modules::stream::adapters::RedisAdapter": backend(RedisSettings, _open_redis),
    "modules::stream::adapters::Bridge": backend(BridgeSettings, _open_bridge),
}


class StreamAdapterRef(AdapterRef):
    """The stream module's ``adapter`` block."""

    KIND = adapter_kind("stream", BACKENDS, DEFAULT_CLASS)


def open_stream_adapter(
    ref: StreamAdapterRef | None, on_peer_event: PeerEventHandler
) -> AbstractAsyncContextManager[StreamAdapter]:
    return open_backend(BACKENDS, ref or StreamAdapterRef.default(), on_peer_event)
