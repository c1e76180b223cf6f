"""What every Redis backend shares: the client, error translation, peer events.

* :class:`RedisSettings` reads the adapter config: ``redis_url`` (upstream's
  key, default ``redis://localhost:6379``), and two of ours: ``key_prefix``
  (prepended to every key and channel, default ``""``: several engines that
  should share data must use the same prefix) and ``timeout_ms`` (the bound
  on one Redis operation, default 5000).
* :func:`open_redis` opens a coredis client in the caller's scope (coredis
  runs on anyio, so it works under trio; its connection pool reconnects by
  itself).  Redis being down at start is logged, not fatal: calls fail with
  ``adapter_unavailable`` until it is back.
* :meth:`RedisConnection.call` runs one operation under the timeout and turns
  failures into :class:`~iii.errors.AdapterUnavailableError` (connection lost,
  refused, timed out) or ``adapter_error`` (Redis answered with an error).
* :class:`RedisChannels` keeps a set of channels subscribed on one pub/sub
  connection and hands each message to a callback.  coredis reconnects and
  resubscribes after an outage (with backoff capped at 1 s); a reconciler
  task applies subscribe/unsubscribe changes and retries them until Redis
  takes them.  Messages published while the connection is down are lost
  (Redis pub/sub has no persistence).
* :class:`PeerEvents` sends events to the other engines on the same Redis
  and prefix: each message is ``{"origin": <engine instance id>, "event": …}``
  and an engine ignores its own.

* :class:`JsonHashes` and :func:`open_json_store`: JSON values in hash
  fields with membership sets, and the client plus peer events a Redis JSON
  store (state, stream) is opened with.

Lifetime: everything lives inside :func:`open_redis`'s block; the subscriber
tasks run in a nursery the backend opens inside it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import attrs
import coredis
import coredis.exceptions
import orjson
import trio
from coredis.retry import CompositeRetryPolicy, ConstantRetryPolicy, ExponentialBackoffRetryPolicy

from iii import json_limits
from iii.adapters.limits import NO_LIMITS, WriteLimits
from iii.adapters.settings import RedisSettings
from iii.errors import AdapterUnavailableError, IIIError
from iii.update_ops import MISSING, UpdateResult, apply_ops

__all__ = [
    "RedisSettings",
    "RedisConnection",
    "RedisChannels",
    "PeerEvents",
    "JsonHashes",
    "open_redis",
    "open_json_store",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


# How a lost or refused Redis connection surfaces through coredis and anyio.
_OUTAGE_ERRORS = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    OSError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


def is_outage(exc: BaseException) -> bool:
    """True if ``exc`` (or every exception in a group) means Redis cannot be reached."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_outage(e) for e in exc.exceptions)
    return isinstance(exc, _OUTAGE_ERRORS)


@attrs.define(eq=False)
class RedisConnection:
    client: coredis.Redis[bytes]
    settings: RedisSettings
    name: str

    def key(self, *parts: str) -> str:
        return self.settings.key_prefix + "".join(parts)

    async def call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; failures become IIIErrors."""
        try:
            with trio.fail_after(self.settings.timeout):
                return await operation()
        except trio.TooSlowError:
            raise AdapterUnavailableError(
                f"{self.name}: Redis did not answer {what} within {self.settings.timeout:g}s"
            ) from None
        except Exception as exc:
            if is_outage(exc):
                raise AdapterUnavailableError(
                    f"{self.name}: Redis is unavailable ({what}): {exc}"
                ) from None
            if isinstance(exc, coredis.exceptions.RedisError):
                raise IIIError(
                    f"{self.name}: Redis refused {what}: {exc}", code="adapter_error"
                ) from None
            raise


@asynccontextmanager
async def open_redis(settings: RedisSettings, *, name: str) -> AsyncIterator[RedisConnection]:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        settings.redis_url,
        connect_timeout=min(settings.timeout, 2.0),
        stream_timeout=settings.timeout,
        # One quick retry for a connection dropped between calls; an outage is
        # reported to the caller rather than retried for long.
        retry_policy=ConstantRetryPolicy(
            (coredis.exceptions.ConnectionError,), retries=1, delay=0.01
        ),
    )
    async with client:
        connection = RedisConnection(client=client, settings=settings, name=name)
        try:
            await connection.call("PING", client.ping)
        except IIIError as exc:
            log.warning(
                "%s: %s; continuing, calls will fail until Redis is reachable", name, exc.message
            )
        yield connection


Handler = Callable[[bytes, bytes], None]  # (channel, payload)


@attrs.define(eq=False)
class RedisChannels:
    """A changing set of subscribed channels on one reconnecting pub/sub connection."""

    connection: RedisConnection
    on_message: Handler
    _wanted: set[str] = attrs.field(factory=set)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _subscribed: trio.Event = attrs.field(factory=trio.Event)

    def want(self, channel: str) -> None:
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._changed.set()

    def drop(self, channel: str) -> None:
        if channel in self._wanted:
            self._wanted.discard(channel)
            self._changed.set()

    async def start(self, nursery: trio.Nursery) -> None:
        """Run in ``nursery``; returns once subscribed, or after the timeout
        if Redis is down (the subscription then happens when it is back)."""
        nursery.start_soon(self.run)
        with trio.move_on_after(self.connection.settings.timeout):
            await self._subscribed.wait()

    async def run(self) -> None:
        """Receive until cancelled.  Opening blocks while Redis is down."""
        retry = CompositeRetryPolicy(
            ExponentialBackoffRetryPolicy(
                (coredis.exceptions.ConnectionError,),
                retries=None,
                base_delay=0.1,
                max_delay=1,
                jitter=True,
            ),
            ConstantRetryPolicy((TimeoutError,), retries=None, delay=0.5),
        )
        while True:
            try:
                async with self.connection.client.pubsub(
                    ignore_subscribe_messages=True, retry_policy=retry, max_idle_seconds=5
                ) as pubsub:
                    async with trio.open_nursery() as channels_nursery:
                        channels_nursery.start_soon(self._reconcile, pubsub)
                        while True:
                            message = await pubsub.get_message()
                            if message is None or message["type"] != "message":
                                continue
                            try:
                                self.on_message(
                                    _as_bytes(message["channel"]), _as_bytes(message["data"])
                                )
                            except Exception:
                                log.exception("%s: pub/sub handler failed", self.connection.name)
            except* anyio.ClosedResourceError:
                # coredis (6.9) tries to UNSUBSCRIBE on its already closed
                # connection when its pub/sub is cancelled; nothing is lost.
                log.debug("%s: pub/sub closed while being cancelled", self.connection.name)
            await trio.sleep(0.1)  # raises Cancelled if that is what happened; else start over

    async def _reconcile(self, pubsub: Any) -> None:
        while True:
            current = {c.decode() if isinstance(c, bytes) else c for c in pubsub.channels}
            add, remove = self._wanted - current, current - self._wanted
            try:
                with trio.fail_after(self.connection.settings.timeout):
                    if add:
                        await pubsub.subscribe(*sorted(add))
                    if remove:
                        await pubsub.unsubscribe(*sorted(remove))
            except Exception as exc:
                if not (is_outage(exc) or isinstance(exc, trio.TooSlowError)):
                    log.exception("%s: changing subscriptions failed", self.connection.name)
                log.debug(
                    "%s: subscriptions not changed yet (%r); retrying", self.connection.name, exc
                )
                await trio.sleep(0.5)
                continue
            if self._wanted == (current | add) - remove:
                self._subscribed.set()
                self._changed = trio.Event()
                with trio.move_on_after(5):  # also re-check now and then
                    await self._changed.wait()


@attrs.define(eq=False)
class PeerEvents:
    """Events between the engines sharing one Redis: publish ours, receive theirs."""

    connection: RedisConnection
    channel: str
    on_event: Callable[[Any], None]
    origin: str = attrs.field(factory=lambda: uuid.uuid4().hex)

    async def publish(self, event: Any) -> None:
        payload = orjson.dumps({"origin": self.origin, "event": event})
        await self.connection.call(
            f"PUBLISH {self.channel}", lambda: self.connection.client.publish(self.channel, payload)
        )

    def _received(self, channel: bytes, payload: bytes) -> None:
        try:
            message = json_limits.loads(payload)
            origin, event = message["origin"], message["event"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning(
                "%s: ignoring a malformed message on %s", self.connection.name, self.channel
            )
            return
        if origin != self.origin:
            self.on_event(event)

    async def start(self, nursery: trio.Nursery) -> None:
        channels = RedisChannels(self.connection, self._received)
        channels.want(self.channel)
        await channels.start(nursery)


# -- JSON values in hashes, with membership sets ----------------------------------
#
# A value lives in a hash field.  Each write also keeps a chain of membership
# sets up to date, e.g. for a stream item: SADD <streams> <stream name> and
# SADD <groups of the stream> <group id>; a delete that empties the hash
# removes the member again, walking up the chain while sets become empty.
# KEYS = [hash, set1, set2, ...], ARGV = [field, <value>, <max old>, member1, ...].
#
# <max old> is the most bytes the old value may have, because the caller's
# answer carries it (iii.adapters.limits; "-1": no limit).  A longer one
# refuses the write in the same atomic step, before anything changes: the
# script returns {0, <its length>}; else {1, old value (absent if none)}.

_SET_SCRIPT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local max_old = tonumber(ARGV[3])
if old and max_old >= 0 and #old > max_old then return {0, #old} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for i = 2, #KEYS do redis.call('SADD', KEYS[i], ARGV[i + 2]) end
return {1, old}
"""

# ARGV = [field, <max old>, member1, ...]; returns as the set script.
_DELETE_SCRIPT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local max_old = tonumber(ARGV[2])
if old and max_old >= 0 and #old > max_old then return {0, #old} end
if old then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if redis.call('HLEN', KEYS[1]) == 0 then
    for i = 2, #KEYS do
      redis.call('SREM', KEYS[i], ARGV[i + 1])
      if redis.call('SCARD', KEYS[i]) > 0 then break end
    end
  end
end
return {1, old}
"""

# Compare-and-set: ARGV = [field, new value, expected present ("0"/"1"),
# expected value, member1, ...].  Returns {1} when written, else {0, present, current}.
_CAS_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (ARGV[3] == '0' and cur) or (ARGV[3] == '1' and cur ~= ARGV[4]) then
  if cur then return {0, 1, cur} end
  return {0, 0, ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for i = 2, #KEYS do redis.call('SADD', KEYS[i], ARGV[i + 3]) end
return {1}
"""

Chain = list[tuple[str, str]]  # (set key, member) from the innermost set outwards


@attrs.define(eq=False)
class JsonHashes:
    """set/get/delete/update of JSON values in hash fields, atomically."""

    connection: RedisConnection
    _set: Any = None
    _delete: Any = None
    _cas: Any = None

    def __attrs_post_init__(self) -> None:
        client = self.connection.client
        self._set = client.register_script(_SET_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)
        self._cas = client.register_script(_CAS_SCRIPT)

    async def get(self, key: str, field: str) -> Any:
        raw = await self.connection.call(
            f"HGET {key}", lambda: self.connection.client.hget(key, field)
        )
        return None if raw is None else json_limits.loads(raw)

    @staticmethod
    def _old(reply: Any, limits: WriteLimits, new_bytes: int | None) -> Any:
        """The old value a set/delete script returned, or the refusal it reported."""
        if int(reply[0]) == 0:  # the old value is too large for the answer
            raise limits.answer_refused(int(reply[1]) + (new_bytes or 0))
        return None if len(reply) < 2 or reply[1] is None else json_limits.loads(reply[1])

    @staticmethod
    def _max_old(limits: WriteLimits, new_bytes: int) -> int:
        if limits.max_answer_bytes is None:
            return -1
        return max(0, limits.max_answer_bytes - new_bytes)

    async def set(
        self, key: str, field: str, value: Any, chain: Chain, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        keys = [key, *(k for k, _ in chain)]
        encoded = orjson.dumps(value)
        limits.check_write(old_bytes=0, new_bytes=len(encoded))
        max_old = self._max_old(limits, len(encoded))
        args = [field, encoded, max_old, *(m for _, m in chain)]
        reply = await self.connection.call(f"set {key}", lambda: self._set(keys=keys, args=args))
        return self._old(reply, limits, len(encoded))

    async def delete(
        self, key: str, field: str, chain: Chain, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        keys = [key, *(k for k, _ in chain)]
        args = [field, self._max_old(limits, 0), *(m for _, m in chain)]
        reply = await self.connection.call(
            f"delete {key}", lambda: self._delete(keys=keys, args=args)
        )
        return self._old(reply, limits, None)

    async def update(
        self, key: str, field: str, ops: Any, chain: Chain, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        """Apply update ops with optimistic concurrency: read, compute, compare-and-set.

        The ops run in Python (:func:`iii.update_ops.apply_ops`), so the result
        is exactly the embedded store's; the Lua script makes the write
        conditional on the value being unchanged, and a lost race recomputes
        from the value the script returned.  The limits are checked on each
        computed value, before its compare-and-set.
        """
        raw = await self.connection.call(
            f"HGET {key}", lambda: self.connection.client.hget(key, field)
        )
        keys = [key, *(k for k, _ in chain)]
        members = [m for _, m in chain]
        for _attempt in range(1000):
            old_value = MISSING if raw is None else json_limits.loads(raw)
            new_value, errors = apply_ops(old_value, ops)
            encoded = orjson.dumps(new_value)
            limits.check_write(old_bytes=len(raw or b""), new_bytes=len(encoded), errors=errors)
            args = [
                field,
                encoded,
                "0" if raw is None else "1",
                raw or b"",
                *members,
            ]
            reply = await self.connection.call(
                f"update {key}", partial(self._cas, keys=keys, args=args)
            )
            if int(reply[0]) == 1:
                return UpdateResult(None if old_value is MISSING else old_value, new_value, errors)
            raw = bytes(reply[2]) if int(reply[1]) == 1 else None
        raise IIIError(
            f"{self.connection.name}: update of {key} kept conflicting", code="adapter_error"
        )

    async def values(self, key: str) -> list[Any]:
        raw = await self.connection.call(f"HVALS {key}", lambda: self.connection.client.hvals(key))
        return [json_limits.loads(v) for v in raw]

    async def members(self, key: str) -> list[str]:
        raw = await self.connection.call(
            f"SMEMBERS {key}", lambda: self.connection.client.smembers(key)
        )
        return sorted(m.decode() if isinstance(m, bytes) else m for m in raw)


@asynccontextmanager
async def open_json_store(
    settings: RedisSettings, *, name: str, events: str, on_peer_event: Callable[[Any], None]
) -> AsyncIterator[tuple[RedisConnection, JsonHashes, PeerEvents]]:
    """What a Redis-backed JSON store (state, stream) is made of, for its lifetime.

    Opens the client, and runs the peer-event subscriber on channel
    ``<key_prefix><events>`` in a nursery of its own until the block is left.
    """
    async with open_redis(settings, name=name) as connection:
        peers = PeerEvents(connection, connection.key(events), on_peer_event)
        async with trio.open_nursery() as store_nursery:
            await peers.start(store_nursery)
            try:
                yield connection, JsonHashes(connection), peers
            finally:
                store_nursery.cancel_scope.cancel()
