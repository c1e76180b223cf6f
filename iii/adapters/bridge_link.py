"""What the Bridge adapters share: their config keys and their engine link.

The ``Bridge`` backends of State, Stream and Queue keep their data in another
iii engine, which this engine reaches as a worker over one supervised
:class:`~iii.link.EngineLink` per adapter.  Config (the adapter's ``config``
block; upstream's key is ``bridge_url``, the others are ours):

=================== ================================================================
``bridge_url``      the remote engine's worker port, ``ws://`` or ``wss://``
                    (default ``ws://localhost:49134``, as upstream)
``token``           a bearer token for the remote's ``auth.tokens`` (optional)
``ca_file``         PEM CA certificates trusted for ``wss://`` instead of the
                    system store (optional)
``call_timeout_ms`` how long one call to the remote may take (default 30000)
``remote``          State and Stream only: ``state`` (default: the remote's
                    ``state::*`` / ``stream::*``, as upstream HEAD) or
                    ``kv_server`` (the seed-era engine's ``kv_server::*``)
=================== ================================================================

:func:`open_bridge_link` runs the link in its own nursery for the adapter's
lifetime.  It waits for the first connection attempt (up to
:data:`STARTUP_WAIT`), so that an engine started beside a running backend
serves at once, and goes on without it otherwise: the engine starts, calls
answer ``adapter_unavailable`` and the link keeps reconnecting.  :meth:`BridgeLink.call`
fails at once with :class:`~iii.errors.AdapterUnavailableError`
(``adapter_unavailable``) while the link is down; the remote's own errors
come back with the remote's code.

Lifetime: the link task lives in :func:`open_bridge_link`'s nursery and is
cancelled when the adapter closes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, Final

import attrs
import trio

from iii.adapters import typed_keys
from iii.client import UsageError
from iii.errors import AdapterUnavailableError, ConfigError, IIIError
from iii.link import EngineLink, LinkConfig, TraceContext

__all__ = [
    "BridgeSettings",
    "BridgeLink",
    "open_bridge_link",
    "DEFAULT_BRIDGE_URL",
    "REMOTES",
    "STARTUP_WAIT",
]

DEFAULT_BRIDGE_URL: Final = "ws://localhost:49134"
REMOTES: Final = ("state", "kv_server")
# Seconds the adapter waits at start for its first connection attempt to end.
STARTUP_WAIT: Final = 5.0
_FIELDS: Final = (
    ("bridge_url", str),
    ("token", str),
    ("ca_file", str),
    ("call_timeout_ms", int),
    ("remote", str),
)


@attrs.frozen(kw_only=True)
class BridgeSettings:
    bridge_url: str = DEFAULT_BRIDGE_URL
    token: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    call_timeout_ms: int = 30_000
    remote: str = "state"

    @classmethod
    def from_raw(cls, raw: Any, *, where: str) -> BridgeSettings:
        """The settings of an adapter ``config`` block; ConfigError names the key."""
        values = typed_keys(raw, where=where, fields=_FIELDS)
        settings = cls(**values)
        if settings.call_timeout_ms <= 0:
            raise ConfigError(
                "must be a positive number of milliseconds", key=f"{where}.call_timeout_ms"
            )
        if settings.remote not in REMOTES:
            raise ConfigError(
                f"must be one of {', '.join(REMOTES)}, got {settings.remote!r}",
                key=f"{where}.remote",
            )
        return settings

    @property
    def call_timeout(self) -> float:
        return self.call_timeout_ms / 1000


@attrs.define(eq=False)
class BridgeLink:
    """The adapter's link and its call timeout."""

    link: EngineLink
    settings: BridgeSettings

    @property
    def connected(self) -> bool:
        return self.link.connected

    async def call(self, function_id: str, data: Any, *, trace: TraceContext | None = None) -> Any:
        """Call the remote; ``adapter_unavailable`` at once while the link is down."""
        with _unavailable_as_adapter_error():
            return await self.link.call(
                function_id,
                data,
                timeout_s=self.settings.call_timeout,
                trace=trace,
                unavailable_code=AdapterUnavailableError.code,
            )

    async def call_void(self, function_id: str, data: Any) -> None:
        """Fire and forget; ``adapter_unavailable`` at once while the link is down."""
        with _unavailable_as_adapter_error():
            await self.link.call_void(
                function_id, data, unavailable_code=AdapterUnavailableError.code
            )


@contextmanager
def _unavailable_as_adapter_error() -> Iterator[None]:
    """An ``adapter_unavailable`` from the link (or the remote) as AdapterUnavailableError,
    which the modules treat as a backend outage (retry, keep serving)."""
    try:
        yield
    except AdapterUnavailableError:
        raise
    except IIIError as exc:
        if exc.code == AdapterUnavailableError.code:
            raise AdapterUnavailableError(exc.message) from None
        raise


async def _first_attempt(link: EngineLink) -> None:
    """Until the link is up or its first attempt failed (at most :data:`STARTUP_WAIT`)."""

    async def wait(outcome: Callable[[], Awaitable[bool]]) -> None:
        await outcome()
        race_nursery.cancel_scope.cancel()

    async with trio.open_nursery() as race_nursery:
        race_nursery.start_soon(wait, partial(link.wait_connected, STARTUP_WAIT))
        race_nursery.start_soon(wait, partial(link.wait_failed_attempts, 1, STARTUP_WAIT))


@asynccontextmanager
async def open_bridge_link(
    raw: Any, *, where: str, name: str, prepare: Callable[[BridgeLink], None] | None = None
) -> AsyncIterator[BridgeLink]:
    """Parse the config, start the link (shown on the remote as ``name``), close it on exit.

    ``prepare`` registers what the adapter needs on the remote (exposed
    functions, triggers) before the first connection, which sends them.
    """
    settings = BridgeSettings.from_raw(raw, where=where)
    try:
        link = EngineLink(
            LinkConfig(
                url=settings.bridge_url,
                name=name,
                description=f"iii {name} adapter",
                token=settings.token,
                ca_file=settings.ca_file,
            )
        )
    except UsageError as exc:
        raise ConfigError(exc.message, key=f"{where}.bridge_url") from None
    bridge = BridgeLink(link, settings)
    if prepare is not None:
        prepare(bridge)
    async with trio.open_nursery() as link_nursery:
        await link_nursery.start(link.run)
        await _first_attempt(link)
        try:
            yield bridge
        finally:
            link_nursery.cancel_scope.cancel()
