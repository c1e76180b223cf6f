"""One peer engine, seen from this one: its link, its mirrored functions and routes.

For each member of the cluster view, :meth:`Peer.run` (a task in the cluster
nursery, under the peer's own cancel scope) keeps an
:class:`~iii.link.EngineLink` to the peer's ``advertise`` URL, authenticated
with the cluster token, and long-polls the peer's catalog over it
(:mod:`iii.cluster.catalog`).  Each catalog is mirrored into this engine's
registry under one *pseudo worker* ``cluster:<peer id>``:

* every function becomes a replica whose handler forwards the call over the
  link (:meth:`Peer.forward`); the registry's replica choice then load
  balances across engines (the pseudo worker's load is the calls in flight
  to the peer, plus one), and the engine's deadline applies as for any call;
* every ``http`` trigger becomes a registration of the pseudo worker, so the
  REST module serves the route here too, and refuses one that conflicts with
  a route of this engine (logged: a route conflict across the cluster).

The mirror exists only while the link is up: when the link drops (the peer
was killed, its socket closed) or the peer leaves the view (no heartbeat for
``dead_after``), the pseudo worker is removed at once (its functions answer
``function_not_found``, its routes 404) and every call in flight to the peer
ends ``invocation_stopped``.

Lifetime: one :meth:`Peer.run` per peer in the view, cancelled when the peer
leaves it; the link runs in the peer's own nursery.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.cluster.catalog import CATALOG_FUNCTION, Catalog, read_catalog
from iii.cluster_channels import bridge_result_refs
from iii.errors import IIIError, InvocationStoppedError
from iii.link import EngineLink, TraceContext
from iii.log import RateLimitedLog, bounded_repr
from iii.native import CallContext, NativeHandler
from iii.registry import RegistryError, TriggerRegistration, WorkerInfo, trigger_key

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Peer", "PSEUDO_PREFIX"]

log = logging.getLogger(__name__)

PSEUDO_PREFIX = "cluster:"
# How long one catalog long poll waits on the peer for a change.
CATALOG_WAIT_MS = 10_000


@attrs.define(eq=False)
class Peer:
    engine: Engine
    engine_id: str
    advertise: str
    link: EngineLink
    host: str = ""
    catalog: Catalog | None = None
    # trigger_key(...) of every trigger the peer's own workers registered (Cluster.fires_here).
    trigger_keys: frozenset[tuple[str, str, bytes]] = frozenset()
    inflight: int = 0
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _handlers: dict[str, NativeHandler] = attrs.field(factory=dict)
    _log: RateLimitedLog = attrs.field(factory=lambda: RateLimitedLog(log))
    gone: bool = False

    @property
    def owner_id(self) -> str:
        return PSEUDO_PREFIX + self.engine_id

    # -- calls to the peer ----------------------------------------------------------

    def _handler(self, function_id: str) -> NativeHandler:
        handler = self._handlers.get(function_id)
        if handler is None:
            # A partial, not a closure: no coroutine layer of its own, which
            # every resumption of the call would pass through.
            handler = self._handlers[function_id] = partial(self.forward, function_id)
        return handler

    async def forward(self, function_id: str, data: Any, ctx: CallContext) -> Any:
        """Run ``function_id`` on the peer; its answer or error comes back as is.

        The engine's own deadline bounds the call (``Engine.invoke`` runs
        every function under it), so the link adds no timeout of its own; a
        call in flight when the peer goes is failed through the link
        (:meth:`stop_calls`).  Nothing per call but the link's table entry:
        this is the forwarding hop's hot path.
        """
        if self.gone:
            raise self._stopped(function_id)
        self.call_started()
        try:
            result = await self.link.call(
                function_id,
                data,
                timeout_s=None,
                trace=TraceContext(traceparent=ctx.traceparent, baggage=ctx.baggage)
                if ctx.traceparent is not None or ctx.baggage is not None
                else None,
                unavailable_code=InvocationStoppedError.code,
            )
        finally:
            self.call_ended()
        return self.bridged_result(result, ctx.caller_worker_id)

    def bridged_result(self, result: Any, owner: str | None) -> Any:
        """The peer's answer as the caller here gets it: channel refs in it (the
        peer's channels) bridged to channels of this engine that ``owner`` opens
        (:class:`~iii.channels.TooManyChannelsError` past the bounds)."""
        return bridge_result_refs(self.engine, self.advertise, result, owner=owner)

    def call_started(self) -> None:
        """A call to the peer is in flight (forwarded here or relayed): its
        replicas weigh the calls in flight plus one in the pick."""
        self.inflight += 1
        self.engine.registry.set_load(self.owner_id, self.inflight + 1)

    def call_ended(self) -> None:
        self.inflight -= 1
        self.engine.registry.set_load(self.owner_id, self.inflight + 1)

    def _stopped(self, function_id: str) -> IIIError:
        return InvocationStoppedError(
            f"Invocation of {function_id} stopped: engine {self.engine_id} left the cluster"
        )

    # -- the mirror -------------------------------------------------------------------

    def mirror(self, catalog: Catalog) -> None:
        """Make this engine's registry hold exactly ``catalog``'s functions and routes."""
        engine, registry, owner = self.engine, self.engine.registry, self.owner_id
        self.catalog = catalog
        self.trigger_keys = frozenset(
            trigger_key(t["trigger_type"], t["function_id"], t["config"]) for t in catalog.triggers
        )
        if owner not in registry.workers:
            registry.add_worker(
                WorkerInfo(
                    id=owner,
                    ip_address=self.host,
                    name=f"iii engine {self.engine_id}",
                    runtime="iii-cluster-peer",
                    status="peer",
                    remote=True,
                )
            )
            # Its replicas weigh its calls in flight plus one (iii.routing.pick_replica).
            registry.set_load(owner, self.inflight + 1)
        worker = registry.workers[owner]
        # Routes first out, functions first in (a route never names a missing function).
        for trigger_id in list(worker.trigger_ids):
            registration = registry.registration(owner, trigger_id)
            wanted = catalog.http.get(trigger_id)
            if (
                registration is None
                or wanted is None
                or registration.function_id != wanted["function_id"]
                or registration.config != wanted["config"]
                or registration.trigger_type != wanted["trigger_type"]
            ):
                engine.unregister_trigger(owner, trigger_id)
        for function_id in list(worker.function_ids):
            if function_id not in catalog.functions:
                engine.unregister_function(function_id, owner=owner)
        for function_id, info in catalog.functions.items():
            entry = registry.functions.get(function_id)
            current = entry.replicas.get(owner) if entry is not None else None
            if current is not None and (
                current.description,
                current.request_format,
                current.response_format,
                current.metadata,
            ) == (
                info["description"],
                info["request_format"],
                info["response_format"],
                info["metadata"],
            ):
                continue
            try:
                engine.register_function(
                    function_id,
                    self._handler(function_id),
                    description=info["description"],
                    request_format=info["request_format"],
                    response_format=info["response_format"],
                    metadata=info["metadata"],
                    owner=owner,
                )
            except RegistryError as exc:
                self._log.warning(
                    "cluster: function %s of engine %s not mirrored: %s",
                    bounded_repr(function_id),
                    self.engine_id,
                    exc,
                    logger=log,
                )
        for trigger_id, info in catalog.http.items():
            if registry.registration(owner, trigger_id) is not None:
                continue
            error = engine.register_trigger(
                TriggerRegistration(
                    worker_id=owner,
                    id=trigger_id,
                    trigger_type=info["trigger_type"],
                    function_id=info["function_id"],
                    config=info["config"],
                    metadata=info["metadata"],
                )
            )
            if error is not None:
                self._log.warning(
                    "cluster: route conflict: the http trigger %s of engine %s (%s) is refused here: %s",
                    bounded_repr(trigger_id),
                    self.engine_id,
                    bounded_repr(info["config"]),
                    error.message,
                    logger=log,
                )

    def unmirror(self) -> None:
        """Remove everything mirrored from this peer, at once."""
        self.catalog = None
        self.trigger_keys = frozenset()
        owner = self.owner_id
        if owner in self.engine.registry.workers:
            self.engine.drop_worker_entries(owner)

    def stop_calls(self) -> None:
        """End every call in flight to the peer with ``invocation_stopped``."""
        self.link.fail_calls(self._stopped)

    def leave(self) -> None:
        """The peer left the view: unmirror, end its calls, stop its task."""
        self.gone = True
        self.unmirror()
        self.stop_calls()
        self.scope.cancel()

    # -- the supervised loop ------------------------------------------------------------

    async def run(self) -> None:
        with self.scope:
            try:
                async with trio.open_nursery() as peer_nursery:
                    await peer_nursery.start(self.link.run)
                    await self._sync()
            finally:
                self.unmirror()
                self.stop_calls()

    async def _sync(self) -> None:
        """Long-poll the peer's catalog while the link is up; unmirror when it drops."""
        while True:
            await self.link.wait_connected(math.inf)
            version: int | None = None
            while self.link.connected:
                try:
                    answer = await self.link.call(
                        CATALOG_FUNCTION,
                        {"after": version, "wait_ms": CATALOG_WAIT_MS},
                        timeout_s=CATALOG_WAIT_MS / 1000 + 5.0,
                    )
                except IIIError as exc:
                    if not self.link.connected:
                        break
                    self._log.warning(
                        "cluster: catalog of engine %s not read: %s: %s",
                        self.engine_id,
                        exc.code,
                        exc.message,
                        logger=log,
                    )
                    await trio.sleep(1.0)
                    continue
                catalog = read_catalog(answer, expected_engine=self.engine_id)
                if catalog is None:
                    self._log.warning(
                        "cluster: engine %s sent an unreadable catalog", self.engine_id, logger=log
                    )
                    await trio.sleep(1.0)
                    continue
                if catalog.version != version or self.catalog is None:
                    self.mirror(catalog)
                version = catalog.version
            self.unmirror()
            self.stop_calls()
