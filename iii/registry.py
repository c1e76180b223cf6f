"""The engine's tables of workers, functions, trigger types and triggers.

Pure and synchronous: nothing here does I/O or awaits.  The engine applies a
protocol message to the registry and then acts on what the call returns (which
module to tell, which provider worker to forward a binding to).  This makes it
the target of the state-machine fuzzer in ``fuzz/``.

Ownership rules (which replace upstream's, see spec protocol.md §3.7):

* **Function replicas.**  Several live workers may register the same function
  id.  Each is a *replica*; the function exists until its last replica is
  gone.  Engine functions (``owner=None``) cannot be shadowed by a worker.
  A call goes to the replica whose worker has the fewest calls pending (all
  functions counted, as :class:`~iii.invocations.PendingTable` reports them
  through :meth:`Registry.set_load`).  Among replicas with equally few, it
  goes to the one that has waited longest: each replica's place is renewed
  when it joins, when it is picked, and whenever its worker's pending count
  changes, and the oldest place wins.  A picked worker's count goes up as
  its call is filed, so equal replicas take turns.  :meth:`FunctionEntry.pick`
  is O(1): a function with several replicas keeps them in one queue per
  pending count (:class:`ReplicaQueues`), and a worker's count change moves
  it in each function it shares with other workers (O(1) per such function).
  In a cluster, a peer engine's replicas belong to a pseudo worker
  (:attr:`WorkerInfo.remote`) whose count is the calls in flight to the peer
  plus one, so an idle local replica wins; they are queued apart from the
  local ones, so a call a peer forwarded picks among the local replicas in
  O(1) too (:meth:`FunctionEntry.pick_local`).
* **Logical triggers.**  Registrations identical in ``(trigger_type,
  function_id, config)`` from any number of workers are one
  :class:`LogicalTrigger`: the trigger type's handler sees it once, it fires
  once per event, and it lives while any registrant is connected.  With
  tokens, only registrations under the same restricted grant (or under
  unrestricted ones) are merged: a trigger fires under its registrants' grant.
* A worker removes only what it registered.  Registrations are keyed by
  ``(worker_id, id)``, so a reconnecting worker replaying the same trigger ids
  never disturbs another connection's entries.
* A registration for a trigger type nobody provides is *parked*, and activated
  when the type appears (HEAD behaviour; v0.4 dropped it silently).
* Services (``registerservice`` and the modules' own) live in
  :attr:`Registry.services` (:mod:`iii.services`); a worker's go with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
import orjson

from iii.grants import Grant, TriggerAccess
from iii.replica_queues import ReplicaQueues
from iii.services import ServiceRefusedError, ServiceRegistration, ServiceTable

__all__ = [
    "Registry",
    "WorkerInfo",
    "FunctionRegistration",
    "FunctionEntry",
    "ReplicaQueues",
    "TriggerType",
    "TriggerTypeHandler",
    "TriggerRegistration",
    "LogicalTrigger",
    "WorkerRemoval",
    "RegistryError",
    "trigger_key",
]


class RegistryError(Exception):
    """A registration that the registry refuses (e.g. shadowing an engine function)."""


class TriggerTypeHandler(Protocol):
    """What an engine module implements to provide a trigger type.

    Both calls are synchronous: validate the config and raise
    :class:`~iii.errors.TriggerRegistrationError` to refuse it, then start any
    background work in the module's own nursery.
    """

    def register_trigger(self, trigger: LogicalTrigger) -> None: ...

    def unregister_trigger(self, trigger: LogicalTrigger) -> None: ...


@attrs.define(eq=False)
class WorkerInfo:
    id: str
    ip_address: str = ""
    connected_at_ms: int = 0
    name: str | None = None
    runtime: str | None = None
    version: str | None = None
    os: str | None = None
    pid: int | None = None
    description: str | None = None
    telemetry: Any = None
    isolation: Any = None
    namespace: str | None = None
    features: tuple[str, ...] = ()
    latest_metrics: Any = None
    status: str = "connected"
    # A peer engine's pseudo worker (iii.cluster.peers): its replicas are
    # weighed apart from this engine's own (ReplicaQueues).
    remote: bool = False
    function_ids: set[str] = attrs.field(factory=set)
    trigger_ids: set[str] = attrs.field(factory=set)
    trigger_type_ids: set[str] = attrs.field(factory=set)

    def listing(self, active_invocations: int) -> dict[str, Any]:
        """This worker as ``engine::workers::list`` shows it (and a cluster catalog)."""
        return {
            "id": self.id,
            "name": self.name,
            "runtime": self.runtime,
            "version": self.version,
            "os": self.os,
            "ip_address": self.ip_address,
            "status": self.status,
            "connected_at_ms": self.connected_at_ms,
            "function_count": len(self.function_ids),
            "functions": sorted(self.function_ids),
            "active_invocations": active_invocations,
            "latest_metrics": self.latest_metrics,
            "pid": self.pid,
            "description": self.description,
            "isolation": self.isolation,
        }


@attrs.define(eq=False)
class FunctionRegistration:
    """One replica of a function: a worker's handler, or an engine-side handler."""

    function_id: str
    owner: str | None  # worker id; None for engine functions
    description: str | None = None
    request_format: Any = None
    response_format: Any = None
    metadata: Any = None
    # Engine-side handler: engine functions, and HTTP-invoked functions that a
    # worker registered (owner set) but the engine calls itself.
    handler: Any = None


@attrs.define(eq=False)
class FunctionEntry:
    function_id: str
    replicas: dict[str | None, FunctionRegistration] = attrs.field(factory=dict)
    latest: FunctionRegistration | None = None
    # Kept only while the function has two replicas or more (Registry).
    queues: ReplicaQueues | None = None

    def pick(self) -> FunctionRegistration:
        """The replica to call: fewest pending, then longest waiting (module docstring)."""
        queues = self.queues
        if queues is None:
            return next(iter(self.replicas.values()))
        return self.replicas[queues.pick()]

    def pick_local(self, is_remote: Callable[[str | None], bool]) -> FunctionRegistration | None:
        """As :meth:`pick`, among this engine's replicas only (a call a peer
        engine forwarded); None if every replica is a peer's.  ``is_remote``
        is asked only about a lone replica."""
        queues = self.queues
        if queues is None:
            replica = next(iter(self.replicas.values()))
            return None if is_remote(replica.owner) else replica
        owner = queues.pick_local()
        return None if owner is None else self.replicas[owner]


@attrs.define(eq=False)
class TriggerType:
    id: str
    description: str = ""
    provider: str | None = None  # worker id, or None for an engine module
    handler: TriggerTypeHandler | None = None
    trigger_request_format: Any = None
    call_request_format: Any = None
    # Declared by the engine module providing the type: the config keys that
    # name functions, and the data a binding receives (iii.grants).
    access: TriggerAccess | None = None


@attrs.frozen
class TriggerRegistration:
    """One worker's ``registertrigger``."""

    worker_id: str | None  # None: registered by the engine itself
    id: str
    trigger_type: str
    function_id: str
    config: Any = None
    metadata: Any = None
    # The registrant's token; the engine fires the trigger under it.
    grant: Grant | None = None

    @property
    def grant_label(self) -> str | None:
        """Registrations share a logical trigger only under the same restricted grant."""
        grant = self.grant
        return None if grant is None or grant.unrestricted else grant.name


def trigger_key(trigger_type: str, function_id: str, config: Any) -> tuple[str, str, bytes]:
    return (trigger_type, function_id, orjson.dumps(config, option=orjson.OPT_SORT_KEYS))


@attrs.define(eq=False)
class LogicalTrigger:
    """The one trigger that identical registrations from several workers share.

    ``id`` is the first registrant's trigger id and stays the same while the
    trigger lives: modules key their work on it, providers know it by it.
    """

    id: str
    trigger_type: str
    function_id: str
    config: Any
    metadata: Any = None
    registrants: set[tuple[str | None, str]] = attrs.field(factory=set)
    active: bool = False  # handed to the type's handler or provider
    # The registrants' grant (they share one: see TriggerRegistration.grant_label);
    # the functions the engine calls for this trigger are checked against it.
    grant: Grant | None = None

    @property
    def key(self) -> tuple[str, str, bytes]:
        return trigger_key(self.trigger_type, self.function_id, self.config)


@attrs.frozen
class WorkerRemoval:
    """What disappeared with a worker, for the engine to act on."""

    worker: WorkerInfo
    functions_gone: list[str]
    triggers_gone: list[LogicalTrigger]
    trigger_types_gone: list[TriggerType]
    services_gone: list[str] = attrs.field(factory=list)


@attrs.define(eq=False)
class Registry:
    workers: dict[str, WorkerInfo] = attrs.field(factory=dict)
    functions: dict[str, FunctionEntry] = attrs.field(factory=dict)
    trigger_types: dict[str, TriggerType] = attrs.field(factory=dict)
    registrations: dict[tuple[str | None, str], TriggerRegistration] = attrs.field(factory=dict)
    # (trigger key, grant label) -> the logical trigger
    triggers: dict[tuple[tuple[str, str, bytes], str | None], LogicalTrigger] = attrs.field(
        factory=dict
    )
    # Bumped whenever the set of function ids changes (functions-available).
    function_set_version: int = 0
    services: ServiceTable = attrs.field(factory=ServiceTable)
    # Calls pending on each live worker (set_load), and, per worker, the
    # functions whose replica queues it is in (those with two replicas or more).
    _loads: dict[str, int] = attrs.field(factory=dict)
    _shared: dict[str, set[str]] = attrs.field(factory=dict)

    # -- workers ---------------------------------------------------------

    def add_worker(self, worker: WorkerInfo) -> None:
        if worker.id in self.workers:
            raise RegistryError(f"worker {worker.id} already registered")
        self.workers[worker.id] = worker

    def remove_worker(self, worker_id: str) -> WorkerRemoval | None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return None
        self._loads.pop(worker_id, None)
        functions_gone = [
            fid for fid in list(worker.function_ids) if self._drop_replica(worker_id, fid)
        ]
        triggers_gone = []
        for trigger_id in list(worker.trigger_ids):
            removed = self._drop_registration(worker_id, trigger_id)
            if removed is not None and removed[1]:
                triggers_gone.append(removed[0])
        types_gone = []
        for type_id in list(worker.trigger_type_ids):
            gone = self.remove_trigger_type(type_id, provider=worker_id)
            if gone is not None:
                types_gone.append(gone)
        services_gone = self.services.remove_worker(worker_id)
        return WorkerRemoval(worker, functions_gone, triggers_gone, types_gone, services_gone)

    # -- services --------------------------------------------------------

    def add_service(self, registration: ServiceRegistration) -> bool:
        """File a service (see :meth:`ServiceTable.add`); its owner must be connected."""
        if registration.owner is not None and registration.owner not in self.workers:
            raise ServiceRefusedError(f"worker {registration.owner} is not connected")
        return self.services.add(registration)

    # -- functions -------------------------------------------------------

    def add_function(self, registration: FunctionRegistration) -> bool:
        """File one replica; returns True if the function id is new."""
        entry = self.functions.get(registration.function_id)
        if entry is not None and None in entry.replicas and registration.owner is not None:
            raise RegistryError(f"{registration.function_id} is an engine function")
        if entry is not None and registration.owner is None and entry.replicas:
            if None in entry.replicas:
                raise RegistryError(f"{registration.function_id} is already registered")
            raise RegistryError(f"{registration.function_id} is already registered by a worker")
        created = entry is None
        if entry is None:
            entry = self.functions[registration.function_id] = FunctionEntry(
                registration.function_id
            )
            self.function_set_version += 1
        owner = registration.owner
        joined = owner not in entry.replicas
        entry.replicas[owner] = registration
        entry.latest = registration
        if owner is not None:
            self.workers[owner].function_ids.add(registration.function_id)
            if joined and len(entry.replicas) >= 2:
                self._enqueue(entry, owner)
        return created

    # -- replica load -------------------------------------------------------

    def load_of(self, worker_id: str) -> int:
        """The load the pick weighs for ``worker_id`` (as last set)."""
        return self._loads.get(worker_id, 0)

    def set_pending(self, worker_id: str, pending: int) -> None:
        """PendingTable's listener: a worker of this engine now has ``pending``
        calls pending, which is its load.  A peer engine's stand-in worker is
        left alone: its load is set by its :class:`~iii.cluster.peers.Peer`
        (calls in flight to the peer, relayed or not, plus one)."""
        worker = self.workers.get(worker_id)
        if worker is not None and not worker.remote:
            self.set_load(worker_id, pending)

    def set_load(self, worker_id: str, load: int) -> None:
        """``worker_id``'s replicas now weigh ``load`` in the pick."""
        if worker_id not in self.workers:
            return  # calls of a gone worker ending
        if load:
            self._loads[worker_id] = load
        else:
            self._loads.pop(worker_id, None)
        functions = self.functions
        for function_id in self._shared.get(worker_id, ()):
            queues = functions[function_id].queues
            assert queues is not None
            queues.move(worker_id, load)

    def _enqueue(self, entry: FunctionEntry, owner: str) -> None:
        """``owner`` joins ``entry``, which now has two replicas or more."""
        if entry.queues is None:
            entry.queues = ReplicaQueues()
            for other in entry.replicas:
                if other != owner:
                    assert other is not None  # engine functions have one replica
                    self._join_queue(entry, entry.queues, other)
        self._join_queue(entry, entry.queues, owner)

    def _join_queue(self, entry: FunctionEntry, queues: ReplicaQueues, owner: str) -> None:
        queues.add(owner, self._loads.get(owner, 0), remote=self.workers[owner].remote)
        self._shared.setdefault(owner, set()).add(entry.function_id)

    def _leave_queue(self, entry: FunctionEntry, owner: str) -> None:
        shared = self._shared.get(owner)
        if shared is not None:
            shared.discard(entry.function_id)
            if not shared:
                del self._shared[owner]

    def remove_function(self, owner: str | None, function_id: str) -> bool:
        """Drop ``owner``'s replica; returns True if the function id is now gone."""
        if owner is not None:
            worker = self.workers.get(owner)
            if worker is None or function_id not in worker.function_ids:
                return False
        return self._drop_replica(owner, function_id)

    def _drop_replica(self, owner: str | None, function_id: str) -> bool:
        if owner is not None and owner in self.workers:
            self.workers[owner].function_ids.discard(function_id)
        entry = self.functions.get(function_id)
        if entry is None or entry.replicas.pop(owner, None) is None:
            return False
        queues = entry.queues
        if queues is not None:
            assert owner is not None
            queues.remove(owner)
            self._leave_queue(entry, owner)
            if len(queues) == 1:  # back to one replica: no queue to keep
                (last,) = queues.load
                self._leave_queue(entry, last)
                entry.queues = None
        if entry.replicas:
            if entry.latest is not None and entry.latest.owner == owner:
                entry.latest = next(reversed(entry.replicas.values()))
            return False
        del self.functions[function_id]
        self.function_set_version += 1
        if owner is None:
            self.services.claimed.pop(function_id, None)  # a later worker's is not the module's
        return True

    # -- trigger types ---------------------------------------------------

    def add_trigger_type(self, trigger_type: TriggerType) -> list[LogicalTrigger]:
        """Record a provider; returns the triggers it must now be given.

        An engine module's type cannot be taken over by a worker.  A worker
        that provides a type already provided by another worker replaces it
        (v0.4 behaviour), and is handed every existing trigger of the type.
        """
        current = self.trigger_types.get(trigger_type.id)
        if current is not None and current.provider is None and trigger_type.provider is not None:
            raise RegistryError(f"trigger type {trigger_type.id} is provided by the engine")
        if (
            current is not None
            and current.provider is not None
            and current.provider in self.workers
        ):
            self.workers[current.provider].trigger_type_ids.discard(trigger_type.id)
        self.trigger_types[trigger_type.id] = trigger_type
        if trigger_type.provider is not None:
            self.workers[trigger_type.provider].trigger_type_ids.add(trigger_type.id)
        pending = [t for t in self.triggers.values() if t.trigger_type == trigger_type.id]
        for trigger in pending:
            trigger.active = False
        return pending

    def remove_trigger_type(self, type_id: str, *, provider: str | None) -> TriggerType | None:
        current = self.trigger_types.get(type_id)
        if current is None or current.provider != provider:
            return None
        del self.trigger_types[type_id]
        if provider is not None and provider in self.workers:
            self.workers[provider].trigger_type_ids.discard(type_id)
        for trigger in self.triggers.values():
            if trigger.trigger_type == type_id:
                trigger.active = False  # parked until the next provider
        return current

    # -- triggers --------------------------------------------------------

    def add_trigger(self, registration: TriggerRegistration) -> tuple[LogicalTrigger, bool]:
        """File a registration; returns its logical trigger and whether it is new.

        The caller must have removed any earlier, different registration with
        the same ``(worker_id, id)`` first (see :meth:`registration`).
        """
        slot = (registration.worker_id, registration.id)
        if slot in self.registrations:
            raise RegistryError(f"trigger {registration.id} is already registered by this worker")
        key = (
            trigger_key(registration.trigger_type, registration.function_id, registration.config),
            registration.grant_label,
        )
        trigger = self.triggers.get(key)
        created = trigger is None
        if trigger is None:
            trigger = self.triggers[key] = LogicalTrigger(
                id=registration.id,
                trigger_type=registration.trigger_type,
                function_id=registration.function_id,
                config=registration.config,
                metadata=registration.metadata,
                grant=registration.grant,
            )
        trigger.registrants.add(slot)
        self.registrations[slot] = registration
        if registration.worker_id is not None:
            self.workers[registration.worker_id].trigger_ids.add(registration.id)
        return trigger, created

    def registration(self, worker_id: str | None, trigger_id: str) -> TriggerRegistration | None:
        return self.registrations.get((worker_id, trigger_id))

    def remove_trigger(
        self, worker_id: str | None, trigger_id: str
    ) -> tuple[LogicalTrigger, bool] | None:
        """Drop one registration; returns its logical trigger and whether that is now gone."""
        return self._drop_registration(worker_id, trigger_id)

    def _drop_registration(
        self, worker_id: str | None, trigger_id: str
    ) -> tuple[LogicalTrigger, bool] | None:
        registration = self.registrations.pop((worker_id, trigger_id), None)
        if worker_id is not None and worker_id in self.workers:
            self.workers[worker_id].trigger_ids.discard(trigger_id)
        if registration is None:
            return None
        key = (
            trigger_key(registration.trigger_type, registration.function_id, registration.config),
            registration.grant_label,
        )
        trigger = self.triggers[key]
        trigger.registrants.discard((worker_id, trigger_id))
        if trigger.registrants:
            return trigger, False
        del self.triggers[key]
        return trigger, True

    def triggers_of_type(self, type_id: str) -> list[LogicalTrigger]:
        return [t for t in self.triggers.values() if t.trigger_type == type_id]
