"""What the cron module needs from a lock backend (:class:`CronLockAdapter`).

Backends import this, never the package ``__init__`` (which imports them).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["CronLockAdapter"]


class CronLockAdapter(Protocol):
    @property
    def lock_ttl(self) -> float: ...

    async def try_lock(self, key: str) -> bool:
        """Take ``key`` for ``lock_ttl`` seconds; False if someone holds it.

        Raises :class:`~iii.errors.AdapterUnavailableError` when the backend
        cannot be reached.
        """
        ...
