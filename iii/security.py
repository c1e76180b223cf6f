"""Who may connect to the worker port and what they may do there; the TLS context.

* :class:`Authenticator` checks the ``Authorization: Bearer <token>`` header of
  an upgrade to ``/`` or ``/otel`` against ``auth.tokens`` (constant-time
  comparison against every token) and returns the matching :class:`Grant`, or
  the reason for a refusal.  With no tokens configured every client is let in
  with :data:`ALLOW_ALL`.  With a ``cluster:`` section, the cluster token
  (whether or not ``auth.tokens`` is set) gets :data:`~iii.grants.CLUSTER_PEER`:
  another engine of the cluster (:mod:`iii.cluster`).  Channel sockets are not checked here: they carry
  their own per-channel access key.
* A :class:`~iii.grants.Grant` is the allow-list of one token (defined in
  :mod:`iii.grants`, re-exported here): function-id patterns a worker may
  register and invoke (binding a trigger counts as invoking its function),
  and trigger types it may bind or provide.
* :func:`server_ssl_context` builds the server-side TLS context from
  ``tls.cert`` / ``tls.key`` (shared by every listener that serves TLS).

Pure functions and frozen values; nothing here does network I/O.  Lifetime:
built once per engine from its config.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from iii.errors import ConfigError
from iii.grants import ALLOW_ALL, ALWAYS_INVOKABLE, CLUSTER_PEER, Grant

if TYPE_CHECKING:
    from iii.config_schema import AuthConfig, TlsConfig

__all__ = [
    "Authenticator",
    "Grant",
    "ALLOW_ALL",
    "AuthRefusal",
    "server_ssl_context",
    "ALWAYS_INVOKABLE",
]


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

    def __init__(self, config: AuthConfig, *, cluster_token: str | None = None):
        self._cluster = cluster_token.encode() if cluster_token else None
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

    def grant_named(self, label: str | None) -> Grant | None:
        """The grant a stored job recorded (by its token's name), for running it later.

        None (nothing enforced) for a job without a name or with no tokens
        configured; a name no token has any more gets a grant that allows
        nothing, so the job fails ``forbidden`` instead of running unchecked.
        """
        if label is None or not self._entries:
            return None
        for entry in self._entries:
            if entry.grant.name == label:
                return entry.grant
        return Grant.from_patterns(label, register=(), invoke=(), trigger_types=())

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Grant | AuthRefusal:
        if not self._entries and self._cluster is None:
            return ALLOW_ALL
        values = [value for name, value in headers if name.lower() == b"authorization"]
        if not values:
            return AuthRefusal("no Authorization header") if self._entries else ALLOW_ALL
        scheme, _, presented = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            if not self._entries:
                return ALLOW_ALL
            return AuthRefusal("Authorization is not a Bearer token")
        presented = presented.strip()
        found: Grant | None = None
        if self._cluster is not None and secrets.compare_digest(self._cluster, presented):
            found = CLUSTER_PEER
        if not self._entries:
            return found or ALLOW_ALL
        # Compare against every token, so timing does not tell which one is near.
        for entry in self._entries:
            if secrets.compare_digest(entry.secret, presented) and found is None:
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
