"""Who may hold a socket on a listening port: connection accounting, counted on accept.

Each listening port (the worker port, the stream port, the REST port) has
one :class:`Admission`, with two budgets (:class:`ConnectionLimits`):

* **Upgraded connections**: at most ``max_connections``.  A request that
  would go past it is answered HTTP 503 at the upgrade.
* **Per peer address**: at most ``max_per_address`` sockets from one address
  that hold no credential: every socket still in its handshake (counted from
  accept, so a socket that never sends its request counts too) and, on a
  port without credentials, the upgraded ones.  A socket past it is refused
  at accept, before anything is read.  A credential (a worker token when
  ``auth.tokens`` is set, or a channel's key under it) takes the socket out
  of its address's count when it upgrades.
* Sockets in their handshake also have a budget of their own,
  ``max_connections`` in all, separate from the upgraded ones: handshakes
  never take an upgraded connection's place, and a refused handshake
  (401, 404, 503) frees its place as soon as the answer is written.

The REST port has no upgrade: its sockets stay in the first state (counted
from accept, per address and in ``max_connections``) until they close.

Addresses: an IPv4 address counts as itself; an IPv6 address by its /64
prefix (one host usually holds a whole /64); an IPv4-mapped IPv6 address as
its IPv4 address.  Anything else (a test's in-memory stream) is one address.

Everything here is synchronous bookkeeping; :mod:`iii.wsserver` and
:mod:`iii.modules.rest_api.server` call it.
Lifetime: one :class:`Admission` per port, alive as long as its owner.
"""

from __future__ import annotations

import ipaddress

import attrs
import trio

__all__ = ["ConnectionLimits", "Admission", "Slot", "address_key", "peer_of"]


def peer_of(stream: trio.abc.Stream) -> tuple[str, str]:
    """("address:port", "address") of the socket under ``stream``."""
    transport = getattr(stream, "transport_stream", stream)  # under TLS, the socket below
    sock = getattr(transport, "socket", None)
    if sock is None:
        return "memory", "memory"  # a test's in-memory stream
    try:
        peer = sock.getpeername()
    except OSError:
        return "?", "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}", str(peer[0])
    return str(peer), str(peer)


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    max_connections: int
    max_per_address: int


def address_key(address: str) -> str:
    """The unit a per-address limit counts in (see the module docstring)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@attrs.define(eq=False)
class Admission:
    limits: ConnectionLimits
    upgraded: int = 0
    handshaking: int = 0
    # Sockets without a credential, per address key.
    by_address: dict[str, int] = attrs.field(factory=dict)

    @property
    def open(self) -> int:
        """Sockets open on the port: upgraded or in their handshake."""
        return self.upgraded + self.handshaking

    def admit(self, address: str) -> Slot | None:
        """A slot for a socket just accepted from ``address``; None: refuse it now."""
        key = address_key(address)
        if self.by_address.get(key, 0) >= self.limits.max_per_address:
            return None
        if self.handshaking >= self.limits.max_connections:
            return None
        self.by_address[key] = self.by_address.get(key, 0) + 1
        self.handshaking += 1
        return Slot(self, key)


@attrs.define(eq=False)
class Slot:
    """One socket's place: handshaking, then upgraded, then released."""

    admission: Admission
    address: str  # the address key
    state: str = "handshaking"
    counted_by_address: bool = True

    def upgrade(self, *, credentialed: bool) -> bool:
        """Move to the upgraded budget; False if ``max_connections`` are upgraded already."""
        admission = self.admission
        if self.state != "handshaking":
            raise RuntimeError(f"cannot upgrade a {self.state} slot")
        if admission.upgraded >= admission.limits.max_connections:
            return False
        admission.handshaking -= 1
        admission.upgraded += 1
        self.state = "upgraded"
        if credentialed:
            self._leave_address()
        return True

    def release(self) -> None:
        """The socket is gone (idempotent)."""
        admission = self.admission
        if self.state == "handshaking":
            admission.handshaking -= 1
        elif self.state == "upgraded":
            admission.upgraded -= 1
        self.state = "released"
        self._leave_address()

    def _leave_address(self) -> None:
        if not self.counted_by_address:
            return
        self.counted_by_address = False
        by_address = self.admission.by_address
        left = by_address[self.address] - 1
        if left:
            by_address[self.address] = left
        else:
            del by_address[self.address]
