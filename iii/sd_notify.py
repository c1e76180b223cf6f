"""The ``sd_notify`` datagrams to systemd (:class:`Notifier`), on their own.

A leaf (it imports nothing from this package), so the engine's systemd
integration (:mod:`iii.systemd`, which runs the engine) and the cluster's
process supervisor (:mod:`iii.cluster.supervisor`, which the engine starts)
can both use it without importing each other.

Lifetime: a notifier's socket lives until :meth:`Notifier.close`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import attrs
import trio

__all__ = ["Notifier"]

log = logging.getLogger("iii.systemd")


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
