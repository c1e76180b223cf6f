"""Stream adapters: where ``stream::*`` keeps ``stream -> group -> item -> value``.

:class:`StreamAdapter` is what the stream module needs; :func:`open_stream_adapter`
maps upstream's class names (spec modules.md §4.4) to a backend here:

===========================================  =========================================
``modules::stream::adapters::KvStore``       :mod:`.embedded` (default): the embedded
                                             store, in memory or ``file_based``
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

import builtins
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, cast

from iii.adapters import import_backend
from iii.adapters.limits import WriteLimits
from iii.config import AdapterRef
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["StreamAdapter", "open_stream_adapter", "BACKENDS", "DEFAULT_CLASS"]

DEFAULT_CLASS = "modules::stream::adapters::KvStore"
BACKENDS = {
    "modules::stream::adapters::KvStore": "iii.adapters.stream.embedded",
    "modules::stream::adapters::RedisAdapter": "iii.adapters.stream.redis",
    "modules::stream::adapters::Bridge": "iii.adapters.stream.bridge",
}


class StreamAdapter(Protocol):
    """Each write takes the call's :class:`~iii.adapters.limits.WriteLimits` and
    checks them in its atomic step before it changes anything."""

    async def get(self, stream: str, group: str, item: str) -> Any: ...

    async def set(
        self, stream: str, group: str, item: str, value: Any, limits: WriteLimits = ...
    ) -> Any:
        """Store the value; returns the previous one (None if there was none)."""

    async def delete(self, stream: str, group: str, item: str, limits: WriteLimits = ...) -> Any:
        """Remove the item atomically; returns the removed value or None."""

    async def update(
        self,
        stream: str,
        group: str,
        item: str,
        ops: builtins.list[UpdateOp],
        limits: WriteLimits = ...,
    ) -> UpdateResult: ...

    async def list(self, stream: str, group: str) -> builtins.list[Any]:
        """The group's values (no ids)."""

    async def list_groups(self, stream: str) -> builtins.list[str]:
        """Groups of the stream holding at least one item, sorted."""

    async def list_all(self) -> builtins.list[tuple[str, builtins.list[str]]]:
        """Every stream with its sorted groups, sorted by stream name."""

    async def publish_event(self, message: dict[str, Any]) -> None:
        """Tell the other engines sharing this backend (no-op when there are none)."""


def open_stream_adapter(
    ref: AdapterRef | None,
    *,
    on_peer_event: Callable[[dict[str, Any]], None],
    where: str = "stream.adapter",
) -> AbstractAsyncContextManager[StreamAdapter]:
    backend, raw = import_backend("stream", BACKENDS, ref, DEFAULT_CLASS, key=f"{where}.class")
    return cast(
        "AbstractAsyncContextManager[StreamAdapter]",
        backend.open_adapter(raw, on_peer_event=on_peer_event, where=where),
    )
