"""Cluster membership in Redis: who is in the cluster, kept with heartbeats and expiry.

Keys (``<name>`` is ``cluster.name``)::

    iii:cluster:<name>:members        set of member ids (an index; may hold dead ids)
    iii:cluster:<name>:member:<id>    the member's record (JSON), SET ... PX <ttl>

Every ``interval`` (``dead_after / 5``) an engine re-sets its record with a
time to live of ``dead_after - interval`` (Redis expires it by itself: no
clocks are compared between machines) and reads everybody's (``SMEMBERS`` then
``MGET``), removing from the index the ids whose record has expired.  So an
engine that stops heartbeating (killed, hung, cut off from Redis) leaves
every peer's view at most ``ttl + interval = dead_after`` after its last
heartbeat.  A clean exit deletes the record at once.

A Redis outage degrades only membership: the heartbeat and the read fail
(logged, rate-limited), the last view is kept (calls over the links that
are up keep working), and both resume when Redis answers again.

Nothing here is a consensus protocol: Redis holds the truth, each engine
reads it.  Records from Redis are peer data: decoded with the size-checked
JSON reader and validated field by field; a bad one is skipped.

Lifetime: the cluster's membership task calls :meth:`Membership.round`
every ``interval`` and :meth:`Membership.leave` on a clean exit, inside
:func:`~iii.adapters.redis_support.open_redis`'s block.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable

import attrs
import orjson

from iii import json_limits
from iii.adapters.redis_support import RedisConnection
from iii.errors import IIIError
from iii.log import RateLimitedLog, bounded_repr

__all__ = ["MemberInfo", "Membership", "member_keys", "describe_self"]

log = logging.getLogger(__name__)

# A record bigger than this is not an iii member's: skipped.
MAX_RECORD_BYTES = 16 * 1024


@attrs.frozen(kw_only=True)
class MemberInfo:
    """One engine of the cluster, as it describes itself in Redis."""

    id: str
    advertise: str
    host: str = ""
    pid: int = 0
    started_ms: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> MemberInfo | None:
        if len(raw) > MAX_RECORD_BYTES:
            return None
        try:
            value = json_limits.loads(raw)
        except (orjson.JSONDecodeError, ValueError):
            return None
        if not isinstance(value, dict):
            return None
        member_id, advertise = value.get("id"), value.get("advertise")
        host, pid, started = value.get("host", ""), value.get("pid", 0), value.get("started_ms", 0)
        if not (isinstance(member_id, str) and 0 < len(member_id) <= 128):
            return None
        if not (isinstance(advertise, str) and advertise.startswith(("ws://", "wss://"))):
            return None
        if not isinstance(host, str) or not isinstance(pid, int) or not isinstance(started, int):
            return None
        return cls(
            id=member_id, advertise=advertise[:512], host=host[:256], pid=pid, started_ms=started
        )


def member_keys(name: str) -> tuple[str, str]:
    """(index set key, record key prefix) of cluster ``name``."""
    base = f"iii:cluster:{name}:"
    return base + "members", base + "member:"


@attrs.define(eq=False)
class Membership:
    """This engine's heartbeat and its view of the others; see the module docstring."""

    redis: RedisConnection
    cluster_name: str
    me: MemberInfo
    dead_after: float
    # Called with the new view (peers only, not this engine) whenever it changes.
    on_view: Callable[[dict[str, MemberInfo]], None]
    view: dict[str, MemberInfo] = attrs.field(factory=dict)
    # Rounds completed (heartbeat written and view read), and failed; for tests.
    rounds: int = 0
    failures: int = 0
    healthy: bool = False
    _outage_log: RateLimitedLog = attrs.field(
        factory=lambda: RateLimitedLog(log, burst=1, interval=30.0)
    )

    @property
    def interval(self) -> float:
        return self.dead_after / 5

    @property
    def ttl_ms(self) -> int:
        return max(1, math.floor((self.dead_after - self.interval) * 1000))

    async def round(self) -> None:
        try:
            await self._heartbeat()
            view = await self._read()
        except IIIError as exc:
            self.failures += 1
            self.healthy = False
            self._outage_log.warning(
                "cluster %s: membership not refreshed (%s); keeping the last view of %d peers",
                self.cluster_name,
                exc.message,
                len(self.view),
                logger=log,
            )
        else:
            if not self.healthy and self.failures:
                log.info("cluster %s: membership refreshed again", self.cluster_name)
            self.healthy = True
            if view != self.view:
                joined = sorted(set(view) - set(self.view))
                left = sorted(set(self.view) - set(view))
                if joined or left:
                    log.info(
                        "cluster %s: view has %d peers (joined %s, left %s)",
                        self.cluster_name,
                        len(view),
                        ", ".join(joined) or "-",
                        ", ".join(left) or "-",
                    )
                self.view = view
                self.on_view(dict(view))
        self.rounds += 1

    async def _heartbeat(self) -> None:
        index, prefix = member_keys(self.cluster_name)
        client = self.redis.client
        record = self.me.to_json()

        async def write() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(prefix + self.me.id, record, px=self.ttl_ms)
                pipe.sadd(index, [self.me.id])
            # coredis runs the pipeline when the block exits

        await self.redis.call("cluster heartbeat", write)

    async def _read(self) -> dict[str, MemberInfo]:
        index, prefix = member_keys(self.cluster_name)
        client = self.redis.client
        ids = sorted(
            (m.decode() if isinstance(m, bytes) else str(m))
            for m in await self.redis.call("cluster SMEMBERS", lambda: client.smembers(index))
        )
        if not ids:
            return {}
        keys = [prefix + member_id for member_id in ids]
        records = await self.redis.call("cluster MGET", lambda: client.mget(keys))
        view: dict[str, MemberInfo] = {}
        expired: list[str] = []
        for member_id, raw in zip(ids, records, strict=True):
            if raw is None:
                expired.append(member_id)
                continue
            info = MemberInfo.from_json(raw if isinstance(raw, bytes) else str(raw).encode())
            if info is None or info.id != member_id:
                log.warning(
                    "cluster %s: skipping an unreadable member record %s",
                    self.cluster_name,
                    bounded_repr(member_id),
                )
                continue
            if info.id != self.me.id:
                view[info.id] = info
        if expired:
            await self.redis.call("cluster SREM", lambda: client.srem(index, expired))
        return view

    async def leave(self) -> None:
        """Delete this engine's record (a clean exit: peers drop it on their next read)."""
        index, prefix = member_keys(self.cluster_name)
        client = self.redis.client
        try:
            await self.redis.call("cluster leave", lambda: client.delete([prefix + self.me.id]))
            await self.redis.call("cluster leave", lambda: client.srem(index, [self.me.id]))
        except IIIError as exc:
            log.info(
                "cluster %s: could not remove this engine's record: %s",
                self.cluster_name,
                exc.message,
            )
        except RuntimeError as exc:  # coredis: the pool is already closing
            log.info(
                "cluster %s: could not remove this engine's record: %s", self.cluster_name, exc
            )


def describe_self(member_id: str, advertise: str) -> MemberInfo:
    return MemberInfo(
        id=member_id,
        advertise=advertise,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_ms=int(time.time() * 1000),
    )
