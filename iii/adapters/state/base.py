"""What the state module needs from a backend (:class:`StateAdapter`), and the
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

__all__ = ["StateAdapter", "PeerEventHandler"]

# on_peer_event(event): a write event another engine made on the shared backend.
PeerEventHandler = Callable[[dict[str, Any]], None]


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
