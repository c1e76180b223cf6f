"""The values an engine link is made of: its config, trace context, handlers, statistics.

Shared by :mod:`iii.link` (the supervised loop and the calls it makes) and
:mod:`iii.link.connection` (one live connection), and re-exported by
:mod:`iii.link`.

Lifetime: none: value types.  :class:`PendingCall` lives as long as one call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio

from iii.client import Endpoint
from iii.errors import IIIError
from iii.protocol import RegisterFunction

__all__ = [
    "LinkConfig",
    "TraceContext",
    "ExposedHandler",
    "LinkStatistics",
    "Exposed",
    "PendingCall",
    "UNAVAILABLE",
]

UNAVAILABLE: Final = "bridge_unavailable"


@attrs.frozen(kw_only=True)
class LinkConfig:
    """Where the link connects and how it behaves (seconds throughout)."""

    url: str
    # Shown on the remote as the worker's name (engine::workers::list).
    name: str = "iii-link"
    description: str = "iii engine link"
    token: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    send_timeout_s: float = 10.0
    heartbeat_interval_s: float = 15.0
    heartbeat_timeout_s: float = 15.0
    max_message_size: int = 64 * 1024 * 1024
    max_concurrent_calls: int = 256
    handler_timeout_s: float = 300.0

    def endpoint(self) -> Endpoint:
        """The parsed URL; raises :class:`~iii.client.UsageError` for a bad one."""
        return Endpoint.parse(self.url, self.token, ca_file=self.ca_file)


@attrs.frozen(kw_only=True)
class TraceContext:
    """W3C trace context that crosses the link (either may be None)."""

    traceparent: str | None = None
    baggage: str | None = None


ExposedHandler = Callable[[Any, TraceContext], Awaitable[Any]]


@attrs.frozen(kw_only=True)
class LinkStatistics:
    connected: bool
    # Connections that got as far as registering, and attempts that failed
    # before that (refused, unreachable, timed out, rejected token ...).
    connections: int
    failed_attempts: int
    calls_in_flight: int
    exposed_calls_running: int
    last_error: str | None


@attrs.define(eq=False)
class Exposed:
    """A function the link serves for the remote, and how it is registered there."""

    handler: ExposedHandler
    registration: RegisterFunction


@attrs.define(eq=False)
class PendingCall:
    """A call the link made that waits for the remote's answer (or for the link to drop)."""

    function_id: str
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: IIIError | None = None
    # Called with the call when it finishes, for a call no task waits on
    # (EngineLink.start_call_nowait).
    on_finish: Callable[[PendingCall], None] | None = None

    def finish(self, result: Any = None, error: IIIError | None = None) -> None:
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()
        if self.on_finish is not None:
            self.on_finish(self)
