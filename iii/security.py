"""Who may connect to the worker port and what they may do there; the TLS context.

* :class:`Authenticator` checks the ``Authorization: Bearer <token>`` header of
  an upgrade to ``/`` or ``/otel`` against ``auth.tokens`` (constant-time
  comparison against every token) and returns the matching :class:`Grant`, or
  the reason for a refusal.  With no tokens configured every client is let in
  with :data:`ALLOW_ALL`.  Channel sockets are not checked here: they carry
  their own per-channel access key.
* A :class:`Grant` is the allow-list of one token: function-id patterns a
  worker may register and invoke (binding a trigger counts as invoking its
  function), and trigger types it may bind or provide.  Patterns are
  ``fnmatch``-style (``*``, ``?``, ``[...]``), compiled once.
* :func:`server_ssl_context` builds the server-side TLS context from
  ``tls.cert`` / ``tls.key`` (shared by every listener that serves TLS).

Pure functions and frozen values; nothing here does network I/O.  Lifetime:
built once per engine from its config.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
import ssl
from collections.abc import Iterable, Sequence

import attrs

from iii.config import AuthConfig, TlsConfig
from iii.errors import ConfigError

__all__ = [
    "Authenticator",
    "Grant",
    "ALLOW_ALL",
    "AuthRefusal",
    "server_ssl_context",
    "ALWAYS_INVOKABLE",
]

# Every SDK calls this at connect to report its metadata; refusing it would
# only lose the worker's name in ``engine::workers::list``.
ALWAYS_INVOKABLE = frozenset({"engine::workers::register"})


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for a pattern list; None means "everything"."""
    if "*" in patterns:
        return None
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@attrs.frozen(kw_only=True)
class Grant:
    """What one authenticated connection may do."""

    name: str
    _register: re.Pattern[str] | None = None
    _invoke: re.Pattern[str] | None = None
    _trigger_types: re.Pattern[str] | None = None

    @classmethod
    def from_patterns(
        cls,
        name: str,
        *,
        register: Sequence[str] = ("*",),
        invoke: Sequence[str] = ("*",),
        trigger_types: Sequence[str] = ("*",),
    ) -> Grant:
        return cls(
            name=name,
            register=_compile(register),
            invoke=_compile(invoke),
            trigger_types=_compile(trigger_types),
        )

    @property
    def unrestricted(self) -> bool:
        return self._register is None and self._invoke is None and self._trigger_types is None

    def may_register(self, function_id: str) -> bool:
        return self._register is None or self._register.match(function_id) is not None

    def may_invoke(self, function_id: str) -> bool:
        if self._invoke is None or function_id in ALWAYS_INVOKABLE:
            return True
        return self._invoke.match(function_id) is not None

    def may_use_trigger_type(self, trigger_type: str) -> bool:
        return self._trigger_types is None or self._trigger_types.match(trigger_type) is not None


ALLOW_ALL = Grant.from_patterns("anonymous")


@attrs.frozen
class AuthRefusal:
    """Why an upgrade was refused (logged; the client only sees 401)."""

    reason: str


@attrs.frozen
class _Entry:
    secret: bytes
    grant: Grant


class Authenticator:
    """Maps a bearer token to its grant; see the module docstring."""

    def __init__(self, config: AuthConfig):
        self._entries = [
            _Entry(
                secret=token.secret.encode(),
                grant=Grant.from_patterns(
                    token.label,
                    register=token.register,
                    invoke=token.invoke,
                    trigger_types=token.trigger_types,
                ),
            )
            for token in config.tokens
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Grant | AuthRefusal:
        if not self._entries:
            return ALLOW_ALL
        values = [value for name, value in headers if name.lower() == b"authorization"]
        if not values:
            return AuthRefusal("no Authorization header")
        scheme, _, presented = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return AuthRefusal("Authorization is not a Bearer token")
        presented = presented.strip()
        found: Grant | None = None
        # Compare against every token, so timing does not tell which one is near.
        for entry in self._entries:
            if secrets.compare_digest(entry.secret, presented):
                found = entry.grant
        if found is None:
            return AuthRefusal("unknown bearer token")
        return found


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The server TLS context for ``tls.cert``/``tls.key``; None when TLS is off."""
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the certificate and key: {exc}", key="tls") from None
    return context
