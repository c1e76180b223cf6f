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

import trio

from iii.config_schema import EngineConfig
from iii.engine import Engine
from iii.sd_notify import Notifier
from iii.serve import serve_engine

__all__ = ["Notifier", "serve_with_systemd"]

log = logging.getLogger(__name__)


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
