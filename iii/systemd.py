"""systemd integration: the ``sd_notify`` protocol and the watchdog.

When systemd starts the engine as a ``Type=notify`` service it sets
``NOTIFY_SOCKET`` (a datagram socket path, ``@`` for the abstract namespace)
and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).  The
protocol is one ``KEY=value`` datagram per state change; it is spoken here
directly (a dozen lines; the libraries for it wrap the same ``sendto``).

:func:`serve_with_systemd` runs :func:`~iii.engine.serve_engine` and, beside
it in the same nursery:

* ``READY=1`` once ``engine.ready`` is set, which happens after every module's
  ``run`` has called ``task_status.started()`` (their ports are bound) and the
  worker listener is bound;
* ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` from a trio task (from READY on),
  so a hung event loop stops the pings and systemd restarts the engine;
* ``STOPPING=1`` when the graceful shutdown starts (``engine.shutting_down``).

Without ``NOTIFY_SOCKET`` nothing is sent and the engine runs as usual.
Lifetime: the notifier tasks live and die with the engine's run.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import attrs
import trio

from iii.config import EngineConfig
from iii.engine import Engine
from iii.serve import serve_engine

__all__ = ["Notifier", "serve_with_systemd"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Notifier:
    """Sends sd_notify datagrams; a no-op when there is no ``NOTIFY_SOCKET``."""

    address: str | None = None
    watchdog_interval: float | None = None  # seconds between WATCHDOG=1
    _sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        interval = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            interval = int(usec) / 1_000_000 / 2
        return cls(address=address, watchdog_interval=interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> None:
        """Send one datagram (``READY=1``, ``STATUS=...``); failures are logged, not raised."""
        if self.address is None:
            return
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", fields[0] if fields else "", exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run_watchdog(self) -> None:
        """Ping from the event loop until cancelled."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)


async def _report_states(engine: Engine, notifier: Notifier, notify_nursery: trio.Nursery) -> None:
    await engine.ready.wait()
    config = engine.config
    notifier.notify(
        "READY=1",
        f"STATUS=listening on {'wss' if config.tls.enabled else 'ws'}://{config.host}:{engine.listen_port}",
    )
    log.debug("sd_notify: READY=1")
    # Startup is bounded by TimeoutStartSec=; the watchdog guards the loop after it.
    notify_nursery.start_soon(notifier.run_watchdog)
    await engine.shutting_down.wait()
    notifier.notify("STOPPING=1", "STATUS=shutting down")
    log.debug("sd_notify: STOPPING=1")


async def serve_with_systemd(
    config: EngineConfig, *, notifier: Notifier | None = None, handle_signals: bool = True
) -> None:
    """``serve_engine`` plus the sd_notify states and the watchdog (see the module docstring)."""
    notifier = notifier or Notifier.from_environ()
    if not notifier.enabled:
        await serve_engine(config, handle_signals=handle_signals)
        return
    engine = Engine(config)
    try:
        async with trio.open_nursery() as notify_nursery:
            notify_nursery.start_soon(_report_states, engine, notifier, notify_nursery)
            await serve_engine(config, handle_signals=handle_signals, engine=engine)
            notify_nursery.cancel_scope.cancel()
    finally:
        notifier.close()
