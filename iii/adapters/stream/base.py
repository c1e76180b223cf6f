"""What the stream module needs from a backend (:class:`StreamAdapter`), and the
callback a shared backend hands other engines' events to (:data:`PeerEventHandler`,
its hooks).

Backends import this, never the package ``__init__`` (which imports them).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any, Protocol

from iii.adapters.limits import WriteLimits
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["StreamAdapter", "PeerEventHandler"]

# on_peer_event(event): a write event another engine made on the shared backend.
PeerEventHandler = Callable[[dict[str, Any]], None]


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
