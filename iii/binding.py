"""Opening a listening TCP port, with an error that says what to change.

Every listener (the worker port, the REST API, the stream port, the metrics
port) binds through :func:`open_tcp_listeners`.  A failure (the port is taken,
the host is not an address of this machine, ...) becomes a
:class:`~iii.errors.BindError` naming the listener, the address and the
config keys that set it (:meth:`iii.config.EngineConfig.listen_keys`); the
CLI prints it on one line with the config file and exits 1.
"""

from __future__ import annotations

import trio

from iii.errors import BindError

__all__ = ["open_tcp_listeners", "NO_KEYS"]

# For a listener whose address comes from code, not from a config (tests).
NO_KEYS = ("the address given in code", False)


async def open_tcp_listeners(
    what: str, host: str | None, port: int, keys: tuple[str, bool] = NO_KEYS
) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners(port, host=host)``; a failure is a :class:`BindError`."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        text, in_file = keys
        raise BindError(what, host, port, text, exc, in_file=in_file) from exc
