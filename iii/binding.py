"""Opening a listening TCP port, with an error that says what to change.

Every listener (the worker port, the REST API, the stream port, the metrics
port) binds through :func:`open_tcp_listeners`.  A failure (the port is taken,
the host is not an address of this machine, ...) becomes a
:class:`~iii.errors.BindError` naming the listener, the address and the
config keys that set it (:meth:`iii.config.EngineConfig.listen_keys`); the
CLI prints it on one line with the config file and exits 1.

Under ``serve --processes N`` (:mod:`iii.cluster.supervisor`) every engine
process gets ``III_REUSE_PORT=1``: its listeners then set ``SO_REUSEPORT``, so
the N processes share the worker, REST and stream ports and the kernel
spreads new connections across them.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from iii.errors import BindError

__all__ = ["open_tcp_listeners", "NO_KEYS", "reuse_port", "REUSE_PORT_ENV"]

REUSE_PORT_ENV = "III_REUSE_PORT"


def reuse_port() -> bool:
    """True in an engine process started by ``serve --processes``."""
    return os.environ.get(REUSE_PORT_ENV) == "1"


# For a listener whose address comes from code, not from a config (tests).
NO_KEYS = ("the address given in code", False)


async def open_tcp_listeners(
    what: str, host: str | None, port: int, keys: tuple[str, bool] = NO_KEYS
) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners(port, host=host)``; a failure is a :class:`BindError`."""
    try:
        if reuse_port() and port != 0:
            return await _open_shared(host, port)
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        text, in_file = keys
        raise BindError(what, host, port, text, exc, in_file=in_file) from exc


async def _open_shared(host: str | None, port: int) -> list[trio.SocketListener]:
    """Like ``trio.open_tcp_listeners``, with ``SO_REUSEPORT`` on every socket."""
    addresses = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners = []
    try:
        for family, kind, proto, _, address in addresses:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
