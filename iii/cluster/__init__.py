"""The cluster: several engines on one Redis act as one engine (``cluster:`` in the config).

Pieces:

* :mod:`iii.cluster.membership`: who is in the cluster (Redis, heartbeats
  with expiry; a silent engine leaves every view within ``dead_after_ms``);
* :mod:`iii.cluster.catalog`: what one engine offers the others (its own
  functions and routes), fetched by each peer with a long poll;
* :mod:`iii.cluster.peers`: for each peer, an :class:`~iii.link.EngineLink`
  (the worker protocol, authenticated with the cluster token) and the mirror
  of its catalog in this engine's registry;
* :mod:`iii.cluster.supervisor`: ``serve --processes N``.

Transport: calls between engines travel over the direct links; Redis only
finds peers and holds membership.  A call a peer forwards here carries the
cluster token's grant (:data:`~iii.grants.CLUSTER_PEER`) and is served by
this engine's own replicas only (``Engine._pick_replica``), so a call is
forwarded at most once.

Supervision (inside the engine's connection nursery, after the listener is
bound)::

    serve (Cluster.run)                 cluster nursery
    ├── Redis client (open_redis)       coredis pool, reconnects by itself
    ├── peer port                       only under --processes: this process's own port
    ├── supervisor watch                only under --processes: EOF on stdin -> shutdown
    ├── membership                      heartbeat + view every dead_after/5
    └── Peer.run (one per peer)         own cancel scope: cancelled when the peer
        ├── EngineLink.run              leaves the view (iii.link)
        └── catalog long poll           mirrors the peer's functions and routes

Channels named in a forwarded call are bridged to the engine that owns them
(:mod:`iii.cluster_channels`).

Lifetime: started by :func:`iii.engine.serve_engine` when the config has a
``cluster`` section; ends with the connection nursery at shutdown (the
membership record is deleted on the way out).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import trio

from iii.adapters.redis_support import RedisSettings, open_redis
from iii.binding import reuse_port
from iii.cluster.catalog import CATALOG_FUNCTION, build_catalog
from iii.cluster.membership import MemberInfo, Membership, describe_self
from iii.cluster.peers import PSEUDO_PREFIX, Peer
from iii.cluster.supervisor import SUPERVISED_ENV, watch_supervisor
from iii.config_schema import Count
from iii.containment import start_contained
from iii.grants import ForbiddenError
from iii.link import EngineLink, LinkConfig
from iii.listener import connection_options, handle_upgrade
from iii.native import CallContext
from iii.registry import LogicalTrigger
from iii.security import server_ssl_context
from iii.wsserver import WebSocketPort, serve_websockets

if TYPE_CHECKING:
    from iii.config import ClusterConfig
    from iii.engine import Engine

__all__ = ["Cluster", "serve_cluster"]

log = logging.getLogger(__name__)

STATUS_FUNCTION = "engine::cluster::status"
# A link's worker name on the peer: the prefix and this engine's id.
LINK_NAME_PREFIX = "iii-cluster:"
# The longest catalog long poll a peer may ask for.
MAX_CATALOG_WAIT = 20.0


@attrs.define(eq=False)
class Cluster:
    """This engine's membership and peers; the engine routes through it (``engine.cluster``)."""

    engine: Engine
    config: ClusterConfig
    engine_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    advertise: str = ""
    peers: dict[str, Peer] = attrs.field(factory=dict)
    catalog_version: int = 0
    membership: Membership | None = None
    _catalog_changed: trio.Event = attrs.field(factory=trio.Event)
    _peer_nursery: trio.Nursery | None = None
    _leave_requested: trio.Event = attrs.field(factory=trio.Event)
    _left: trio.Event = attrs.field(factory=trio.Event)

    # -- routing (Engine._pick_replica) and introspection ------------------------------

    def is_remote(self, owner: str | None) -> bool:
        return (
            owner is not None
            and owner.startswith(PSEUDO_PREFIX)
            and owner[len(PSEUDO_PREFIX) :] in self.peers
        )

    def engine_of(self, owner: str | None) -> str:
        """The engine a replica or worker lives on."""
        if owner is not None and owner.startswith(PSEUDO_PREFIX):
            return owner[len(PSEUDO_PREFIX) :]
        return self.engine_id

    def remote_workers(self) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = []
        for peer in self.peers.values():
            if peer.catalog is not None:
                workers.extend({**w, "engine": peer.engine_id} for w in peer.catalog.workers)
        return workers

    def remote_triggers(self) -> list[dict[str, Any]]:
        triggers: list[dict[str, Any]] = []
        for peer in self.peers.values():
            if peer.catalog is not None:
                triggers.extend({**t, "engine": peer.engine_id} for t in peer.catalog.triggers)
        return triggers

    def fires_here(self, trigger: LogicalTrigger) -> bool:
        """For a fan-out event (state, stream, pubsub: every engine receives it):
        whether this engine fires ``trigger``.  Engines holding an identical
        trigger agree without talking: the lowest engine id among them fires."""
        key = trigger.key
        for peer in self.peers.values():
            if peer.engine_id < self.engine_id and peer.link.connected and key in peer.trigger_keys:
                return False
        return True

    def peer_url_of_link(self, worker_id: str) -> str | None:
        """The advertised URL of the peer engine behind a link connection to us."""
        info = self.engine.registry.workers.get(worker_id)
        name = info.name if info is not None else None
        if not name or not name.startswith(LINK_NAME_PREFIX):
            return None
        peer = self.peers.get(name[len(LINK_NAME_PREFIX) :])
        return peer.advertise if peer is not None else None

    def is_peer_link(self, worker_id: str) -> bool:
        """A connection made by a peer engine (its link to us)."""
        connection = self.engine.connections.get(worker_id)
        return connection is not None and connection.grant.cluster_peer

    # -- the catalog ------------------------------------------------------------------

    def _changed(self, *_: Any) -> None:
        self.catalog_version += 1
        self._catalog_changed.set()
        self._catalog_changed = trio.Event()

    async def status(self, data: Any, ctx: CallContext) -> Any:
        """``engine::cluster::status``: this engine, its view and its links."""
        membership = self.membership
        return {
            "name": self.config.name,
            "engine": self.engine_id,
            "advertise": self.advertise,
            "membership_healthy": membership.healthy if membership is not None else False,
            "peers": [
                {
                    "engine": peer.engine_id,
                    "advertise": peer.advertise,
                    "linked": peer.link.connected,
                    "synced": peer.catalog is not None,
                    "functions": len(peer.catalog.functions) if peer.catalog is not None else 0,
                    "calls_in_flight": peer.inflight,
                }
                for peer in self.peers.values()
            ],
        }

    async def catalog(self, data: Any, ctx: CallContext) -> Any:
        if ctx.grant is None or not ctx.grant.cluster_peer:
            raise ForbiddenError(f"only engines of the cluster may call {CATALOG_FUNCTION}")
        after = data.get("after") if isinstance(data, dict) else None
        wait_ms = data.get("wait_ms") if isinstance(data, dict) else None
        wait = min(max(wait_ms / 1000, 0.0), MAX_CATALOG_WAIT) if isinstance(wait_ms, int) else 0.0
        if after == self.catalog_version and not self.engine.shutting_down.is_set():
            # A long poll never holds up a shutdown (it would count as a call in flight).
            with trio.move_on_after(wait):
                await self._catalog_changed.wait()
                await trio.sleep(0.02)  # let a burst of registrations settle
        return build_catalog(self.engine, self)

    # -- membership -------------------------------------------------------------------

    def _on_view(self, view: dict[str, MemberInfo]) -> None:
        for engine_id in list(self.peers):
            member = view.get(engine_id)
            if member is None or member.advertise != self.peers[engine_id].advertise:
                log.info("cluster %s: engine %s left", self.config.name, engine_id)
                self.peers.pop(engine_id).leave()
        for engine_id, member in view.items():
            if engine_id in self.peers or self._peer_nursery is None:
                continue
            peer = self._new_peer(member)
            self.peers[engine_id] = peer
            log.info(
                "cluster %s: engine %s joined (%s)", self.config.name, engine_id, member.advertise
            )
            start_contained(self._peer_nursery, f"cluster peer {engine_id}", peer.run)

    def _new_peer(self, member: MemberInfo) -> Peer:
        dead_after = self.config.dead_after
        link = EngineLink(
            LinkConfig(
                url=member.advertise,
                name=f"{LINK_NAME_PREFIX}{self.engine_id}",
                description=f"cluster {self.config.name}: engine {self.engine_id}",
                token=self.config.secret,
                connect_timeout_s=max(dead_after, 1.0),
                backoff_initial_s=min(0.1, dead_after / 10),
                backoff_max_s=max(dead_after / 2, 0.2),
                heartbeat_interval_s=max(dead_after / 2, 0.1),
                heartbeat_timeout_s=max(dead_after / 2, 0.1),
                max_message_size=self.engine.config.max_message_size,
                max_concurrent_calls=1,
            )
        )
        return Peer(self.engine, member.id, member.advertise, link, host=member.host)

    def default_advertise(self, port: int) -> str:
        config = self.engine.config
        if self.config.advertise is not None:
            parts = urlsplit(self.config.advertise)
            host = parts.hostname or "127.0.0.1"
            scheme = parts.scheme
        else:
            host = config.host
            scheme = "wss" if config.tls.enabled else "ws"
            if host in ("0.0.0.0", "::", ""):
                host = socket.gethostname()
                log.info(
                    "cluster: advertising %s; set cluster.advertise if peers reach this engine otherwise",
                    host,
                )
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    async def _serve_peer_port(
        self, *, task_status: trio.TaskStatus[WebSocketPort] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """This process's own port for peers, when the worker port is shared
        (``serve --processes``: a peer must reach this very process)."""
        engine = self.engine
        assert engine.connection_nursery is not None
        await serve_websockets(
            partial(handle_upgrade, engine),
            host=engine.config.host,
            port=0,
            ssl_context=server_ssl_context(engine.config.tls),
            admission=engine.sockets,
            options=connection_options(engine),
            port_name="cluster peer port",
            handler_nursery=engine.connection_nursery,
            task_status=task_status,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED
    ) -> None:
        engine = self.engine
        dead_after = self.config.dead_after
        settings = RedisSettings(
            redis_url=self.config.redis_url,
            timeout_ms=Count(max(1000, min(5000, int(dead_after * 1000 / 2)))),
        )
        engine.register_function(
            CATALOG_FUNCTION, self.catalog, description="This engine's catalog (cluster peers only)"
        )
        engine.register_function(
            STATUS_FUNCTION, self.status, description="This engine's view of the cluster"
        )
        engine.function_listeners.append(self._changed)
        engine.trigger_listeners.append(self._changed)
        engine.worker_listeners.append(self._changed)
        engine.cluster = self
        try:
            async with (
                open_redis(settings, name=f"cluster {self.config.name}") as redis,
                trio.open_nursery() as cluster_nursery,
            ):
                if reuse_port():
                    peer_port = await cluster_nursery.start(self._serve_peer_port)
                    self.advertise = self.default_advertise(peer_port.port)
                elif self.config.advertise is not None:
                    self.advertise = self.config.advertise
                else:
                    assert engine.listen_port is not None
                    self.advertise = self.default_advertise(engine.listen_port)
                self.membership = Membership(
                    redis=redis,
                    cluster_name=self.config.name,
                    me=describe_self(self.engine_id, self.advertise),
                    dead_after=dead_after,
                    on_view=self._on_view,
                )
                self._peer_nursery = cluster_nursery
                if os.environ.get(SUPERVISED_ENV) == "1":
                    cluster_nursery.start_soon(watch_supervisor, engine.request_shutdown)
                await self.membership.round()
                cluster_nursery.start_soon(self._membership_loop)
                cluster_nursery.start_soon(self._end_long_polls)
                log.info(
                    "cluster %s: engine %s at %s (%d peers)",
                    self.config.name,
                    self.engine_id,
                    self.advertise,
                    len(self.membership.view),
                )
                task_status.started(self)
        finally:
            self._peer_nursery = None
            for peer in list(self.peers.values()):
                peer.leave()
            self.peers.clear()
            engine.cluster = None
            engine.function_listeners.remove(self._changed)
            engine.trigger_listeners.remove(self._changed)
            engine.worker_listeners.remove(self._changed)
            engine.unregister_function(CATALOG_FUNCTION)
            engine.unregister_function(STATUS_FUNCTION)

    async def leave(self) -> None:
        """Shutdown: stop heartbeating and delete this engine's record (bounded).

        Done by the membership task itself (between two rounds, never in the
        middle of a Redis call), so peers drop this engine at once."""
        self._leave_requested.set()
        with trio.move_on_after(2.0):
            await self._left.wait()

    async def _end_long_polls(self) -> None:
        await self.engine.shutting_down.wait()
        self._changed()

    async def _membership_loop(self) -> None:
        membership = self.membership
        assert membership is not None
        try:
            while not self._leave_requested.is_set():
                with trio.move_on_after(membership.interval):
                    await self._leave_requested.wait()
                if not self._leave_requested.is_set():
                    await membership.round()
            await membership.leave()
        finally:
            self._left.set()


async def serve_cluster(
    engine: Engine, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED
) -> None:
    assert engine.config.cluster is not None
    await Cluster(engine, engine.config.cluster).run(task_status=task_status)
