"""The HTTP functions module's transport: a request's head and a small body in one write.

httpx (through httpcore) writes a request's head, then its body, in two
writes.  A receiver that reads until the end of the head and takes what came
with it as the body (the official SDK suites' webhook probe does exactly
that; upstream's Rust client writes both at once) then sees an empty body
whenever it wakes up between the two writes, and by closing with the body
unread it resets the connection under our client.  We keep httpx and
coalesce below it, at the network stream:

* :class:`CoalescingStream` holds what httpcore writes while it adds up to at
  most :data:`COALESCE_BYTES`, and sends it in one write when httpcore starts
  reading the answer (it reads only once the request is written), when the
  next write would pass the bound (a large body: the head goes, then the
  body as it comes), before TLS starts, or on close (dropped: nothing
  waits for it).  A failed write at that point is swallowed, and the read
  goes on, as httpcore does with a failed write: a server may answer early
  and close; the read then returns that answer, or fails.
* :class:`CoalescingBackend` wraps every stream httpcore opens, and the TLS
  stream ``start_tls`` returns, so an HTTPS request coalesces above TLS
  (one TLS write, one socket write).
* :func:`coalescing_transport` is an ``httpx.AsyncHTTPTransport`` whose
  connection pool uses that backend.  httpx 0.28 takes no network backend
  (encode/httpx#3749 adds one; it is open), so the transport's pool, built
  by httpx with the same limits, is replaced by one with our backend: the
  one private name we use (``_pool``, in httpx since 0.18); pyproject pins
  httpx below 0.29, and ``tests/modules/test_http_functions.py`` (a receiver
  that reads once after the head) fails if the coalescing is lost.

Lifetime: a stream lives as long as httpcore's connection; the transport as
long as the module's httpx client for one (scheme, host).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = [
    "COALESCE_BYTES",
    "CoalescingStream",
    "CoalescingBackend",
    "client_ssl_context",
    "coalescing_transport",
]

# A request whose head and body add up to at most this goes in one write.
COALESCE_BYTES = 64 * 1024


class CoalescingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream):
        self._inner = inner
        self._pending = bytearray()
        self._timeout: float | None = None  # the write timeout of the held bytes

    async def _flush(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await self._inner.write(data, timeout=self._timeout)

    # (The timeout parameters are httpcore's stream and backend interface.)
    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        if len(self._pending) + len(buffer) <= COALESCE_BYTES:
            self._pending += buffer
            self._timeout = timeout
            return
        await self._flush()
        await self._inner.write(buffer, timeout=timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            await self._flush()
        except httpcore.WriteError:
            pass  # as httpcore does: the server may have answered before closing
        return await self._inner.read(max_bytes, timeout=timeout)

    async def aclose(self) -> None:
        self._pending.clear()
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        await self._flush()
        inner = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return CoalescingStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class CoalescingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, each stream wrapped in a :class:`CoalescingStream`."""

    def __init__(self) -> None:
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return CoalescingStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return CoalescingStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def client_ssl_context() -> ssl.SSLContext:
    """The CAs HTTPS functions are verified against: certifi's (no SSL_CERT_FILE:
    the environment is not trusted)."""
    return httpx.create_ssl_context(trust_env=False)


def coalescing_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An HTTP/1.1 transport (no proxy from the environment) whose connections
    write a request's head and small body at once."""
    ssl_context = client_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False, limits=limits)
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError("httpx.AsyncHTTPTransport no longer keeps its pool in _pool")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=CoalescingBackend(),
    )
    return transport
