"""The HTTP functions module (``modules::http_functions::HttpFunctionsModule``).

A worker's ``registerfunction`` with an ``invocation`` block (spec
protocol.md §2.1, modules.md §9) makes the *engine* call that URL whenever
the function is invoked.  This module builds that engine-side handler
(``engine.external_function_factory``) and owns the HTTP client.

Request: the configured method (POST by default) with the JSON of the input
as body (sent even for GET), headers ``Content-Type: application/json``,
``x-iii-Function-Path``, ``x-iii-Invocation-ID``, ``x-iii-Timestamp``, then
the configured headers, then auth:

* ``{"type": "bearer", "token_key": ENV}``: ``Authorization: Bearer <token>``;
* ``{"type": "basic", "username_key": ENV, "password_key": ENV}``:
  ``Authorization: Basic ...`` (ours; upstream has no basic auth);
* ``{"type": "api_key", "header": H, "value_key": ENV}``: ``H: <value>``;
* ``{"type": "hmac", "secret_key": ENV}``: ``x-iii-Signature: sha256=<hex
  HMAC-SHA256(secret, "<timestamp>:<base64(body)>")>`` (upstream's scheme).

Secrets come only from engine environment variables whose names match
``secret_env_allowlist`` (globs; empty by default, so no auth secret is
readable until configured).  Upstream reads any variable a worker names, so a
worker could have the engine send any secret to a URL of its choosing.

URL safety, checked at registration (what can be checked without DNS) and on
every call: the scheme is http(s), https unless ``require_https`` is off, no
credentials in the URL, the host matches ``url_allowlist`` (globs on the
host), and with ``block_private_ips`` every address the host resolves to must
be public: loopback, private, link-local, CGNAT (100.64/10), NAT64,
IPv4-mapped IPv6, 6to4/Teredo wrapping a blocked address, multicast,
unspecified, reserved and cloud metadata addresses (169.254.169.254,
fd00:ec2::254) are refused.  The host is resolved once per call and the
request goes to the checked address (TLS still verifies the host name via
SNI), so a second DNS answer cannot rebind it; redirects are not followed.
A refusal at registration rejects the function (``url_validation_failed``);
on a call it is an ``invocation_failed`` error naming the rule.

Answers: 2xx with an empty body is null, 2xx otherwise is parsed as JSON
(``invalid_response`` if it is not); other statuses give the body's
``{"error": {"code", "message"}}`` if it has one, else ``http_error`` /
``HTTP <status>``; a transport failure is ``http_request_failed``.

The request's head and a body of up to 64 KiB go in one write
(:mod:`iii.modules._http_transport`), as upstream's client sends them: a
receiver that reads once after the head gets the whole body.

Lifetime: :meth:`Module.run` installs the factory, then holds one httpx
client per (scheme, host) (connections are never shared between host names,
so a pooled TLS connection always matches its SNI) until the engine stops.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpx
import orjson
import trio

from iii import json_limits
from iii.errors import IIIError
from iii.log import bounded_repr
from iii.modules import ModuleStatistics
from iii.modules._http_transport import coalescing_transport
from iii.native import CallContext, NativeHandler

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = [
    "Config",
    "SecurityConfig",
    "Module",
    "HttpInvocation",
    "UrlRefusedError",
    "blocked_address_reason",
    "check_url",
    "sign_body",
]

log = logging.getLogger(__name__)

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
DNS_TIMEOUT = 10.0
MAX_CLIENTS = 256  # distinct (scheme, host) pools kept open
MAX_KEEPALIVE = 50  # idle connections per host (upstream's figure)
CLIENT_TIMEOUT_CAP = 60.0  # upstream's overall cap on one request


@attrs.frozen(kw_only=True)
class SecurityConfig:
    url_allowlist: tuple[str, ...] = ("*",)
    block_private_ips: bool = True
    require_https: bool = True


@attrs.frozen(kw_only=True)
class Config:
    security: SecurityConfig = SecurityConfig()
    # Ours: names (globs) of the engine environment variables that auth
    # blocks may read secrets from.  Empty: none.
    secret_env_allowlist: tuple[str, ...] = ()
    default_timeout_ms: int = 30_000
    # Ours: a larger response body fails the call.
    max_response_size: int = 16 * 1024 * 1024


class UrlRefusedError(Exception):
    """A URL that the security rules refuse; the message names the rule."""


# -- address and URL rules -----------------------------------------------------------

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def blocked_address_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be called (None: it is a public address)."""
    if address in _METADATA:
        return "cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        if address in _IPV4_MAPPED:
            return "IPv4-mapped IPv6 address"
        if any(address in network for network in _NAT64):
            return "NAT64 address"
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            inner = blocked_address_reason(embedded)
            if inner is not None:
                return f"6to4/Teredo address wrapping a {inner}"
    if address.is_loopback:
        return "loopback address"
    if address.is_link_local:
        return "link-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "CGNAT (shared, 100.64.0.0/10) address"
    if address.is_unspecified:
        return "unspecified address"
    if address.is_multicast:
        return "multicast address"
    if address.is_private:  # RFC 1918, fc00::/7, and the special-purpose ranges
        return "private or special-purpose address"
    if not address.is_global:
        return "reserved (not globally routable) address"
    return None


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


@attrs.frozen
class CheckedUrl:
    url: str
    scheme: str
    host: str  # lower case, no brackets
    port: int
    target: str  # path and query, what goes after the authority


def check_url(url: str, security: SecurityConfig) -> CheckedUrl:
    """The rules that need no DNS; raises :class:`UrlRefusedError`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefusedError(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefusedError(f"invalid URL {url!r}: it needs http(s)://host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefusedError("the URL must not carry credentials (use auth)")
    if security.require_https and scheme != "https":
        raise UrlRefusedError(f"HTTPS is required, got {scheme}://")
    host = parts.hostname.lower()
    patterns = security.url_allowlist or ("*",)
    if not any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in patterns):
        raise UrlRefusedError(f"host {host} is not in the url_allowlist")
    if security.block_private_ips:
        literal = _ip_literal(host)
        if literal is not None:
            reason = blocked_address_reason(literal)
            if reason is not None:
                raise UrlRefusedError(f"{host} is a {reason} (block_private_ips)")
    target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return CheckedUrl(
        url=url,
        scheme=scheme,
        host=host,
        port=port if port is not None else (443 if scheme == "https" else 80),
        target=target,
    )


def sign_body(body: bytes, secret: str, timestamp: int) -> str:
    """Upstream's HMAC: ``sha256=<hex HMAC-SHA256(secret, "<ts>:<base64(body)>")>``."""
    payload = f"{timestamp}:{base64.b64encode(body).decode()}".encode()
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


# -- the invocation block ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HttpInvocation:
    """A validated ``invocation`` block with its secrets resolved."""

    url: CheckedUrl
    method: str
    timeout: float
    headers: tuple[tuple[str, str], ...]
    auth_headers: tuple[tuple[str, str], ...]  # fixed auth headers (bearer, basic, api_key)
    hmac_secret: str | None


def _invalid(message: str) -> IIIError:
    return IIIError(message, code="invalid_invocation")


class _Secrets:
    def __init__(self, allowlist: tuple[str, ...]):
        self.allowlist = allowlist

    def read(self, name: Any, field: str, missing_code: str) -> str:
        if not isinstance(name, str) or not name:
            raise _invalid(f"auth.{field} must name an environment variable")
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allowlist):
            raise IIIError(
                f"environment variable {name} is not in secret_env_allowlist of the http_functions module",
                code="secret_not_allowed",
            )
        value = os.environ.get(name)
        if value is None:
            raise IIIError(f"environment variable {name} is not set", code=missing_code)
        return value


def parse_invocation(raw: Any, config: Config) -> HttpInvocation:
    """Validate an ``invocation`` block; raises :class:`IIIError` with a clear code."""
    if not isinstance(raw, dict):
        raise _invalid("invocation must be an object with a url")
    url = raw.get("url")
    if not isinstance(url, str) or not url:
        raise _invalid("invocation.url must be a non-empty string")
    try:
        checked = check_url(url, config.security)
    except UrlRefusedError as exc:
        raise IIIError(f"URL refused: {exc}", code="url_validation_failed") from None
    method = raw.get("method") or "POST"
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise _invalid(f"invocation.method must be one of {', '.join(METHODS)}")
    timeout_ms = raw.get("timeout_ms")
    if timeout_ms is None:
        timeout_ms = config.default_timeout_ms
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
        raise _invalid("invocation.timeout_ms must be a positive integer")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise _invalid("invocation.headers must map strings to strings")
    for name, value in headers.items():
        if not name or any(c in name for c in " \t\r\n:") or any(c in value for c in "\r\n"):
            raise _invalid(f"invocation.headers has an invalid header {name!r}")
    auth_headers: list[tuple[str, str]] = []
    hmac_secret = None
    auth = raw.get("auth")
    if auth is not None:
        if not isinstance(auth, dict):
            raise _invalid("invocation.auth must be an object")
        secrets = _Secrets(config.secret_env_allowlist)
        kind = auth.get("type")
        if kind == "bearer":
            token = secrets.read(auth.get("token_key"), "token_key", "token_not_found")
            auth_headers.append(("Authorization", f"Bearer {token}"))
        elif kind == "basic":
            user = secrets.read(auth.get("username_key"), "username_key", "username_not_found")
            password = secrets.read(auth.get("password_key"), "password_key", "password_not_found")
            encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
            auth_headers.append(("Authorization", f"Basic {encoded}"))
        elif kind == "api_key":
            header = auth.get("header")
            if not isinstance(header, str) or not header or any(c in header for c in " \t\r\n:"):
                raise _invalid("auth.header must be a header name")
            value = secrets.read(auth.get("value_key"), "value_key", "api_key_not_found")
            auth_headers.append((header, value))
        elif kind == "hmac":
            hmac_secret = secrets.read(auth.get("secret_key"), "secret_key", "secret_not_found")
        else:
            raise _invalid(
                f"auth.type {bounded_repr(kind)} is not one of bearer, basic, api_key, hmac"
            )
    return HttpInvocation(
        url=checked,
        method=method.upper(),
        timeout=min(timeout_ms / 1000, CLIENT_TIMEOUT_CAP),
        headers=tuple(headers.items()),
        auth_headers=tuple(auth_headers),
        hmac_secret=hmac_secret,
    )


# -- the module --------------------------------------------------------------------------


def _refused(rule: str) -> IIIError:
    return IIIError(f"URL refused: {rule}", code="invocation_failed")


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.clients: OrderedDict[tuple[str, str], httpx.AsyncClient] = OrderedDict()
        # Calls using each client right now: a client dropped from
        # ``clients`` (least recently used) is closed only once it is idle.
        self._in_use: dict[httpx.AsyncClient, int] = {}
        self._dropped: set[httpx.AsyncClient] = set()  # out of the pool, still in use
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        engine = self.engine
        try:
            with engine.using_external_function_factory(self.build_handler):
                async with trio.open_nursery() as module_nursery:
                    self._nursery = module_nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for client in {*self.clients.values(), *self._in_use}:
                    await client.aclose()
            self.clients.clear()
            self._in_use.clear()

    # -- registration (synchronous: called while a registerfunction is handled) --

    def build_handler(self, function_id: str, raw: Any) -> NativeHandler:
        """The engine-side handler for an HTTP-invoked function; :class:`IIIError` refuses it."""
        invocation = parse_invocation(raw, self.config)
        log.info("HTTP function %s -> %s %s", function_id, invocation.method, invocation.url.url)

        async def handler(data: Any, ctx: CallContext) -> Any:
            return await self.call(function_id, invocation, data, ctx)

        return handler

    # -- a call ---------------------------------------------------------------------

    async def _resolve(self, url: CheckedUrl) -> list[str]:
        """The addresses this call may go to (all of them checked), in resolver order."""
        security = self.config.security
        literal = _ip_literal(url.host)
        if literal is not None:
            addresses = [literal]
        else:
            with trio.move_on_after(DNS_TIMEOUT) as scope:
                try:
                    infos = await trio.socket.getaddrinfo(
                        url.host, url.port, type=socket.SOCK_STREAM
                    )
                except OSError as exc:
                    raise _refused(f"DNS lookup failed for {url.host}: {exc}") from None
            if scope.cancelled_caught:
                raise _refused(f"DNS lookup for {url.host} timed out")
            addresses = []
            for info in infos:
                address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if address not in addresses:
                    addresses.append(address)
            if not addresses:
                raise _refused(f"DNS lookup for {url.host} gave no address")
        if security.block_private_ips:
            for address in addresses:
                reason = blocked_address_reason(address)
                if reason is not None:
                    raise _refused(
                        f"{url.host} resolves to {address}, a {reason} (block_private_ips)"
                    )
        return [str(address) for address in addresses]

    def _acquire_client(self, url: CheckedUrl) -> httpx.AsyncClient:
        """The client for the URL's (scheme, host), held until :meth:`_release_client`."""
        key = (url.scheme, url.host)
        client = self.clients.get(key)
        if client is not None:
            self.clients.move_to_end(key)
        else:
            limits = httpx.Limits(max_keepalive_connections=MAX_KEEPALIVE)
            client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,  # no proxy from the environment: the checked address is the one called
                # The head and a small body in one write (iii.modules._http_transport).
                transport=coalescing_transport(limits),
            )
            self.clients[key] = client
            if len(self.clients) > MAX_CLIENTS:
                _, oldest = self.clients.popitem(last=False)
                if oldest in self._in_use:
                    self._dropped.add(oldest)  # closed by the last call using it
                else:
                    self._close_client(oldest)
        self._in_use[client] = self._in_use.get(client, 0) + 1
        return client

    def _release_client(self, client: httpx.AsyncClient) -> None:
        left = self._in_use[client] - 1
        if left:
            self._in_use[client] = left
            return
        del self._in_use[client]
        if client in self._dropped:
            self._dropped.discard(client)
            self._close_client(client)

    def _close_client(self, client: httpx.AsyncClient) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(client.aclose)

    async def call(
        self, function_id: str, invocation: HttpInvocation, data: Any, ctx: CallContext
    ) -> Any:
        try:
            url = check_url(invocation.url.url, self.config.security)  # again on every call
        except UrlRefusedError as exc:
            raise _refused(str(exc)) from None
        addresses = await self._resolve(url)
        body = orjson.dumps(data)
        timestamp = int(time.time())
        default_port = 443 if url.scheme == "https" else 80
        authority = f"[{url.host}]" if ":" in url.host else url.host
        host_header = authority if url.port == default_port else f"{authority}:{url.port}"
        headers = [
            ("Host", host_header),
            ("Content-Type", "application/json"),
            ("x-iii-Function-Path", function_id),
            ("x-iii-Invocation-ID", ctx.invocation_id or ""),
            ("x-iii-Timestamp", str(timestamp)),
            *invocation.headers,
            *invocation.auth_headers,
        ]
        if invocation.hmac_secret is not None:
            headers.append(("x-iii-Signature", sign_body(body, invocation.hmac_secret, timestamp)))
        # TLS verifies the certificate for the host name, not the address.
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        client = self._acquire_client(url)
        try:
            with trio.move_on_after(invocation.timeout + 1) as scope:
                # The checked addresses in order; the next one only when the
                # connection to one could not be made (nothing was sent yet).
                for index, address in enumerate(addresses):
                    pinned = f"[{address}]" if ":" in address else address
                    request = client.build_request(
                        invocation.method,
                        f"{url.scheme}://{pinned}:{url.port}{url.target}",
                        content=body,
                        headers=headers,
                        timeout=invocation.timeout,
                        extensions=extensions,
                    )
                    try:
                        status, content = await self._send(url, client, request)
                        break
                    except httpx.ConnectError as exc:
                        if index == len(addresses) - 1:
                            raise IIIError(
                                f"{invocation.method} {url.url} failed: cannot connect: {exc}",
                                code="http_request_failed",
                            ) from None
        finally:
            self._release_client(client)
        if scope.cancelled_caught:
            raise IIIError(
                f"{invocation.method} {url.url} timed out after {invocation.timeout:g}s",
                code="http_request_failed",
            )
        return self._result(url, status, content)

    async def _send(
        self, url: CheckedUrl, client: httpx.AsyncClient, request: httpx.Request
    ) -> tuple[int, bytes]:
        """One request; httpx.ConnectError passes through, other failures are IIIErrors."""
        limit = self.config.max_response_size
        try:
            response = await client.send(request, stream=True)
            try:
                parts = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise IIIError(
                            f"response of {url.url} is larger than {limit} bytes",
                            code="invalid_response",
                        )
                    parts.append(chunk)
            finally:
                await response.aclose()
        except httpx.ConnectError:
            raise
        except httpx.HTTPError as exc:
            raise IIIError(
                f"{request.method} {url.url} failed: {type(exc).__name__}: {exc}",
                code="http_request_failed",
            ) from None
        return response.status_code, b"".join(parts)

    def _result(self, url: CheckedUrl, status: int, content: bytes) -> Any:
        if 200 <= status < 300:
            if not content.strip():
                return None
            try:
                return json_limits.loads(content)
            except json_limits.JsonTooDeepError as exc:
                raise IIIError(
                    f"response of {url.url} is {exc.reason}", code="invalid_response"
                ) from None
            except orjson.JSONDecodeError:
                raise IIIError(
                    f"response of {url.url} is not JSON", code="invalid_response"
                ) from None
        try:
            body = json_limits.loads(content) if content else None
        except orjson.JSONDecodeError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = error.get("code")
            message = error.get("message")
            raise IIIError(
                message if isinstance(message, str) else "HTTP request failed",
                code=code if isinstance(code, str) else "http_error",
            )
        raise IIIError(f"HTTP {status}", code="http_error")

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
