"""State adapters: where ``state::*`` keeps ``scope -> key -> value``.

:class:`StateAdapter` is what the state module needs; :func:`open_state_adapter`
maps upstream's adapter class names (spec modules.md §5) to a backend here:

=========================================  ==========================================
``modules::state::adapters::KvStore``      :mod:`.embedded` (default, or ``embedded``):
                                           the embedded store, in memory or on disk
``modules::state::adapters::RedisAdapter`` :mod:`.redis` (``redis_url``)
``modules::state::adapters::Bridge``       :mod:`.bridge` (``bridge_url``): the data
                                           stays in another iii engine, reached
                                           over a supervised link; ``state::*``
                                           there, or ``kv_server::*`` with
                                           ``remote: kv_server``
=========================================  ==========================================

Events between engines: a backend shared by several engines (Redis) passes
each write event to the others; ``on_peer_event`` receives the events other
engines made, so their state triggers fire here too.  The embedded backend
serves one engine and never calls it, nor does the Bridge (as upstream: the
remote engine fires its own state triggers).

Lifetime: :func:`open_state_adapter` returns the backend's context manager;
the module keeps it open for its whole run.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from iii.adapters import Backend, adapter_kind, backend, open_backend
from iii.adapters.settings import BridgeSettings, RedisSettings
from iii.adapters.state import embedded
from iii.adapters.state.base import PeerEventHandler, StateAdapter
from iii.config_schema import AdapterRef

__all__ = [
    "StateAdapter",
    "StateAdapterRef",
    "PeerEventHandler",
    "open_state_adapter",
    "BACKENDS",
    "DEFAULT_CLASS",
]

DEFAULT_CLASS = "modules::state::adapters::KvStore"


# The embedded backend is imported with the package; the others only when a
# config chooses them (their config classes live apart, in iii.adapters.settings
# or the queue's base.py, so loading a config does not import them).  Each
# opener is typed: mypy holds the backend's factory to its config class and
# what it yields to the Protocol.
def _open_redis(
    config: RedisSettings, hooks: PeerEventHandler
) -> AbstractAsyncContextManager[StateAdapter]:
    from iii.adapters.state import redis

    return redis.open_adapter(config, hooks)


def _open_bridge(
    config: BridgeSettings, hooks: PeerEventHandler
) -> AbstractAsyncContextManager[StateAdapter]:
    from iii.adapters.state import bridge

    return bridge.open_adapter(config, hooks)


BACKENDS: dict[str, Backend[Any, PeerEventHandler, StateAdapter]] = {
    DEFAULT_CLASS: backend(embedded.Config, embedded.open_adapter),
    "modules::state::adapters::RedisAdapter": backend(RedisSettings, _open_redis),
    "modules::state::adapters::Bridge": backend(BridgeSettings, _open_bridge),
}


class StateAdapterRef(AdapterRef):
    """The state module's ``adapter`` block."""

    KIND = adapter_kind("state", BACKENDS, DEFAULT_CLASS)


def open_state_adapter(
    ref: StateAdapterRef | None, on_peer_event: PeerEventHandler
) -> AbstractAsyncContextManager[StateAdapter]:
    return open_backend(BACKENDS, ref or StateAdapterRef.default(), on_peer_event)
