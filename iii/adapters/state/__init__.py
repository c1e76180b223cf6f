"""State adapters: where ``state::*`` keeps ``scope -> key -> value``.

:class:`StateAdapter` is what the state module needs; :func:`open_state_adapter`
maps upstream's adapter class names (spec modules.md §5) to a backend here:

=========================================  ==========================================
``modules::state::adapters::KvStore``      :mod:`.embedded` (default): the embedded
                                           store, in memory or ``file_based``
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

import builtins
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, cast

from iii.adapters import import_backend
from iii.adapters.limits import WriteLimits
from iii.config import AdapterRef
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["StateAdapter", "open_state_adapter", "BACKENDS", "DEFAULT_CLASS"]

DEFAULT_CLASS = "modules::state::adapters::KvStore"
BACKENDS = {
    "modules::state::adapters::KvStore": "iii.adapters.state.embedded",
    "modules::state::adapters::RedisAdapter": "iii.adapters.state.redis",
    "modules::state::adapters::Bridge": "iii.adapters.state.bridge",
}


class StateAdapter(Protocol):
    """Each write takes the call's :class:`~iii.adapters.limits.WriteLimits` and
    checks them in its atomic step before it changes anything."""

    async def get(self, scope: str, key: str) -> Any: ...

    async def set(self, scope: str, key: str, value: Any, limits: WriteLimits = ...) -> Any:
        """Store the value; returns the previous one (None if there was none)."""

    async def delete(self, scope: str, key: str, limits: WriteLimits = ...) -> Any:
        """Remove the key atomically; returns the removed value or None."""

    async def update(
        self, scope: str, key: str, ops: builtins.list[UpdateOp], limits: WriteLimits = ...
    ) -> UpdateResult: ...

    async def list(self, scope: str) -> builtins.list[Any]: ...

    async def list_groups(self) -> builtins.list[str]:
        """Scopes holding at least one key, sorted."""

    async def publish_event(self, event: dict[str, Any]) -> None:
        """Tell the other engines sharing this backend (no-op when there are none)."""


PeerEventHandler = Callable[[dict[str, Any]], None]


def open_state_adapter(
    ref: AdapterRef | None, *, on_peer_event: PeerEventHandler, where: str = "state.adapter"
) -> AbstractAsyncContextManager[StateAdapter]:
    backend, raw = import_backend("state", BACKENDS, ref, DEFAULT_CLASS, key=f"{where}.class")
    return cast(
        "AbstractAsyncContextManager[StateAdapter]",
        backend.open_adapter(raw, on_peer_event=on_peer_event, where=where),
    )
