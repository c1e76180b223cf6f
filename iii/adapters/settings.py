"""The configs of the backends that are imported only when a config chooses them.

The config loader structures every ``adapter`` block when the file is read,
so it needs each backend's config class; the Redis, RabbitMQ and Bridge
backends' implementations are large to import (coredis alone takes about
0.3 s), so their config classes live here (those of the queue backends, which build
on the queue's common keys, in :mod:`iii.adapters.queue.base`), and each
backend's file names its own (``Config = RedisCronConfig``).  The embedded
backends are light and declare theirs in their own file.  See :mod:`iii.adapters` for how the
kinds open a backend lazily.

Values only; nothing here opens anything.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

from iii.client import Endpoint, UsageError
from iii.config_schema import Count, check

__all__ = [
    "RedisSettings",
    "RedisCronConfig",
    "LinkSettings",
    "BridgeSettings",
    "DEFAULT_REDIS_URL",
    "DEFAULT_BRIDGE_URL",
    "LINK_KEYS",
    "URL_CHECK",
    "TOKEN_CHECK",
]

DEFAULT_REDIS_URL: Final = "redis://localhost:6379"
DEFAULT_BRIDGE_URL: Final = "ws://localhost:49134"


# -- Redis ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RedisSettings:
    """The config of a Redis backend of pubsub, state and stream: ``redis_url``,
    ``key_prefix`` and ``timeout_ms`` (each command's)."""

    redis_url: str = attrs.field(
        default=DEFAULT_REDIS_URL,
        validator=check(
            lambda url: url.startswith(("redis://", "rediss://", "unix://")),
            "must be a redis://, rediss:// or unix:// URL",
        ),
    )
    key_prefix: str = ""
    timeout_ms: Count = Count(5000)

    @property
    def timeout(self) -> float:
        return self.timeout_ms / 1000


@attrs.frozen(kw_only=True)
class RedisCronConfig:
    """``modules::cron::RedisCronAdapter``: upstream's ``redis_url``, and our
    ``lock_ttl_ms`` and ``key_prefix``."""

    redis_url: str = DEFAULT_REDIS_URL
    lock_ttl_ms: Count = Count(30_000)
    key_prefix: str = ""


# -- Bridge -----------------------------------------------------------------------------


def _valid_url(url: str) -> bool:
    try:
        Endpoint.parse(url)
    except UsageError:
        return False
    return True


def _valid_token(token: str | None) -> bool:
    if token is None:
        return True
    try:
        Endpoint.parse(DEFAULT_BRIDGE_URL, token)
    except UsageError:
        return False
    return True


# The link keys' validators (BridgeQueueConfig, in the queue package, declares them too).
URL_CHECK: Final = check(_valid_url, "must be a ws:// or wss:// URL with a host")
TOKEN_CHECK: Final = check(_valid_token, "must be printable ASCII without spaces")
LINK_KEYS: Final = ("bridge_url", "token", "ca_file", "call_timeout_ms")


@attrs.frozen(kw_only=True)
class LinkSettings:
    """The keys of every Bridge adapter's link: upstream's ``bridge_url``, and
    our ``token``, ``ca_file`` and ``call_timeout_ms``."""

    bridge_url: str = attrs.field(default=DEFAULT_BRIDGE_URL, validator=URL_CHECK)
    token: str | None = attrs.field(default=None, repr=False, validator=TOKEN_CHECK)
    ca_file: str | None = None
    call_timeout_ms: Count = Count(30_000)

    @property
    def call_timeout(self) -> float:
        return self.call_timeout_ms / 1000


@attrs.frozen(kw_only=True)
class BridgeSettings(LinkSettings):
    """A State or Stream Bridge: the link, and which functions the remote answers."""

    remote: Literal["state", "kv_server"] = "state"
