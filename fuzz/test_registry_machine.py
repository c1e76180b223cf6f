"""A state machine over the synchronous core: the registry and the pending table.

Workers connect and disconnect; register and unregister functions, trigger
types and triggers; calls are filed, answered, timed out, and stopped, in any
order.  A small model next to it says what must be true after every step:

* every request is answered exactly once (result, ``invocation_stopped``, or
  abandoned with its caller);
* nothing is owned by, pending on, or registered to a worker that is gone;
* a function exists exactly while at least one replica is live;
* a logical trigger exists exactly while one of its registrants is live, and
  the registry's indexes agree with each other;
* a service exists exactly while a live worker (or a module) registered it,
  its byte and count accounting matches what is held, a module's service is
  never taken over, and every function is listed under at most one service;
* a call goes where a naive model of the replica policy (iii.registry's
  docstring) says: the fewest calls pending on the worker, then the replica
  whose place (joined, picked, or its worker's count changed) is oldest; some
  workers stand for peer engines (``remote``: a load set from outside, as
  the cluster sets the calls in flight to the peer plus one), and a call a
  peer forwarded picks among the others only, by the same rule.
"""

from __future__ import annotations

import itertools
import uuid

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from iii.invocations import DuplicateInvocationError, Invocation, PendingTable
from iii.registry import (
    FunctionRegistration,
    Registry,
    RegistryError,
    TriggerRegistration,
    TriggerType,
    WorkerInfo,
)
from iii.services import ServiceRefusedError, ServiceRegistration

FUNCTIONS = ["f::a", "f::b", "f::c", "f::x::y", "mod::z"]
SERVICES = ["f", "f::x", "g", "mod"]  # "mod" belongs to a module
DESCRIPTIONS = [None, "", "d", "é" * 40]

TRIGGER_IDS = ["t1", "t2", "t3"]
TRIGGER_TYPES = ["webhook", "tick"]
CONFIGS = [None, {"a": 1}, {"a": 2}]


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.registry = Registry()
        self.pending = PendingTable(on_load=self._load_changed)
        # The naive model of the pick policy: a place per (function, replica),
        # renewed on join, pick and load change; the smallest (load, place) wins.
        self.clock = itertools.count()
        self.places: dict[tuple[str, str], int] = {}
        self.live: list[str] = []
        self.remote: dict[str, int] = {}  # peer engines' pseudo workers -> their load
        self.answers: dict[str, int] = {}  # invocation id -> answers delivered
        self.open_calls: dict[str, Invocation] = {}  # filed and still waited on
        self.registry.add_service(ServiceRegistration(id="mod", name="mod", module="modules::m::M"))

    # -- workers -----------------------------------------------------------

    @rule()
    def connect(self) -> None:
        worker_id = str(uuid.uuid4())
        self.registry.add_worker(WorkerInfo(id=worker_id))
        self.live.append(worker_id)

    @rule()
    def connect_peer(self) -> None:
        """A peer engine's pseudo worker: idle, so its load is 0 + 1."""
        worker_id = "cluster:" + str(uuid.uuid4())
        self.registry.add_worker(WorkerInfo(id=worker_id, remote=True))
        self.live.append(worker_id)
        self._set_peer_load(worker_id, 1)

    @precondition(lambda self: self.remote)
    @rule(index=st.integers(0, 10), load=st.integers(1, 4))
    def peer_load(self, index: int, load: int) -> None:
        """Calls in flight to a peer begin or end."""
        peers = sorted(self.remote)
        self._set_peer_load(peers[index % len(peers)], load)

    def _set_peer_load(self, worker_id: str, load: int) -> None:
        self.remote[worker_id] = load
        self.registry.set_load(worker_id, load)
        for function_id, owner in self.places:
            if owner == worker_id:
                self.places[(function_id, owner)] = next(self.clock)

    def _load_of(self, owner: str) -> int:
        remote = self.remote.get(owner)
        return self.pending.executing_on(owner) if remote is None else remote

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10))
    def disconnect(self, index: int) -> None:
        worker_id = self.live.pop(index % len(self.live))
        self.remote.pop(worker_id, None)
        # What Engine.forget_worker does, in the same order.
        for invocation in self.pending.stop_target(worker_id):
            self._deliver(invocation)
        for invocation in [i for i in self.open_calls.values() if i.caller_worker_id == worker_id]:
            # The caller's connection nursery is cancelled: its waiting task
            # discards the record and answers nobody.
            self.pending.discard(invocation)
            self.open_calls.pop(invocation.invocation_id)
        removal = self.registry.remove_worker(worker_id)
        assert removal is not None

    # -- functions -----------------------------------------------------------

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10), function_id=st.sampled_from(FUNCTIONS))
    def register_function(self, index: int, function_id: str) -> None:
        owner = self.live[index % len(self.live)]
        entry = self.registry.functions.get(function_id)
        joined = entry is None or owner not in entry.replicas
        self.registry.add_function(FunctionRegistration(function_id=function_id, owner=owner))
        assert owner in self.registry.functions[function_id].replicas
        if joined:  # a re-registration keeps the replica's place
            self.places[(function_id, owner)] = next(self.clock)

    @precondition(lambda self: self.live)
    @rule(function_id=st.sampled_from(FUNCTIONS))
    def scale_out(self, function_id: str) -> None:
        """Every live worker registers the function (replicas meet often)."""
        for index in range(len(self.live)):
            self.register_function(index, function_id)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10), function_id=st.sampled_from(FUNCTIONS))
    def unregister_function(self, index: int, function_id: str) -> None:
        owner = self.live[index % len(self.live)]
        entry = self.registry.functions.get(function_id)
        replicas = set(entry.replicas) if entry is not None else set()
        others = replicas - {owner}
        gone = self.registry.remove_function(owner, function_id)
        assert gone == (owner in replicas and not others)
        if others:
            assert set(self.registry.functions[function_id].replicas) == others

    @rule(function_id=st.sampled_from(FUNCTIONS))
    def engine_function_cannot_be_shadowed(self, function_id: str) -> None:
        if function_id in self.registry.functions:
            try:
                self.registry.add_function(
                    FunctionRegistration(function_id=function_id, owner=None)
                )
            except RegistryError:
                return
            raise AssertionError("an engine function replaced worker replicas")

    # -- services ------------------------------------------------------------------

    @precondition(lambda self: self.live)
    @rule(
        index=st.integers(0, 10),
        service_id=st.sampled_from(SERVICES),
        description=st.sampled_from(DESCRIPTIONS),
        parent=st.sampled_from([None, *SERVICES]),
    )
    def register_service(self, index: int, service_id: str, description, parent) -> None:
        owner = self.live[index % len(self.live)]
        registration = ServiceRegistration(
            id=service_id,
            name=service_id,
            description=description,
            parent_service_id=parent,
            owner=owner,
        )
        current = self.registry.services.services.get(service_id)
        module_owned = current is not None and None in current.registrations
        try:
            self.registry.add_service(registration)
        except ServiceRefusedError:
            assert module_owned
            return
        assert not module_owned
        service = self.registry.services.services[service_id]
        assert service.latest is registration and service.registrations[owner] is registration

    @rule(service_id=st.sampled_from(SERVICES))
    def module_service_cannot_be_shadowed(self, service_id: str) -> None:
        try:
            self.registry.add_service(
                ServiceRegistration(id=service_id, name=service_id, module="x")
            )
        except ServiceRefusedError:
            assert service_id in self.registry.services.services
            return
        # Nobody held it: the module has it now, and keeps it.
        assert self.registry.services.services[service_id].latest.owner is None

    # -- trigger types and triggers ------------------------------------------------------

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10), type_id=st.sampled_from(TRIGGER_TYPES))
    def provide_type(self, index: int, type_id: str) -> None:
        provider = self.live[index % len(self.live)]
        replay = self.registry.add_trigger_type(TriggerType(id=type_id, provider=provider))
        assert {t.trigger_type for t in replay} <= {type_id}
        assert len(replay) == len(self.registry.triggers_of_type(type_id))

    @precondition(lambda self: self.live)
    @rule(
        index=st.integers(0, 10),
        trigger_id=st.sampled_from(TRIGGER_IDS),
        type_id=st.sampled_from(TRIGGER_TYPES),
        function_id=st.sampled_from(FUNCTIONS),
        config=st.sampled_from(CONFIGS),
    )
    def register_trigger(self, index, trigger_id, type_id, function_id, config) -> None:
        worker_id = self.live[index % len(self.live)]
        registration = TriggerRegistration(worker_id, trigger_id, type_id, function_id, config)
        if self.registry.registration(worker_id, trigger_id) is not None:
            self.registry.remove_trigger(worker_id, trigger_id)
        trigger, _ = self.registry.add_trigger(registration)
        assert (worker_id, trigger_id) in trigger.registrants

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10), trigger_id=st.sampled_from(TRIGGER_IDS))
    def unregister_trigger(self, index: int, trigger_id: str) -> None:
        worker_id = self.live[index % len(self.live)]
        had = self.registry.registration(worker_id, trigger_id) is not None
        removed = self.registry.remove_trigger(worker_id, trigger_id)
        assert (removed is not None) == had

    # -- calls -----------------------------------------------------------------------------

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10), function_id=st.sampled_from(FUNCTIONS), times=st.integers(1, 4))
    def calls(self, index: int, function_id: str, times: int) -> None:
        for _ in range(times):
            self.call(index, function_id)

    def call(self, index: int, function_id: str) -> None:
        caller = self.live[index % len(self.live)]
        entry = self.registry.functions.get(function_id)
        if entry is None:
            return  # function_not_found, answered at once
        expected = min(
            entry.replicas,
            key=lambda o: (self._load_of(o), self.places[(function_id, o)]),  # type: ignore[arg-type]
        )
        replica = entry.pick()
        assert replica.owner == expected
        self.places[(function_id, expected)] = next(self.clock)
        if expected in self.remote:
            return  # forwarded to the peer: its load is the peer_load rule's
        self._file(replica.owner, function_id, caller)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10), function_id=st.sampled_from(FUNCTIONS))
    def forwarded_call(self, index: int, function_id: str) -> None:
        """A call a peer engine forwarded: this engine's replicas only."""
        caller = self.live[index % len(self.live)]
        entry = self.registry.functions.get(function_id)
        if entry is None:
            return
        local = [o for o in entry.replicas if o not in self.remote]
        replica = entry.pick_local(lambda o: o in self.remote)
        if not local:
            assert replica is None
            return
        expected = min(
            local,
            key=lambda o: (self._load_of(o), self.places[(function_id, o)]),  # type: ignore[arg-type]
        )
        assert replica is not None and replica.owner == expected
        self.places[(function_id, expected)] = next(self.clock)
        self._file(replica.owner, function_id, caller)

    def _file(self, target: str | None, function_id: str, caller: str) -> None:
        invocation = Invocation(
            invocation_id=str(uuid.uuid4()),
            function_id=function_id,
            target_worker_id=target,
            caller_worker_id=caller,
        )
        self.pending.add(invocation)
        self.open_calls[invocation.invocation_id] = invocation
        self.answers[invocation.invocation_id] = 0

    @precondition(lambda self: self.open_calls)
    @rule(index=st.integers(0, 100), from_target=st.booleans())
    def answer(self, index: int, from_target: bool) -> None:
        invocation = list(self.open_calls.values())[index % len(self.open_calls)]
        sender = invocation.target_worker_id if from_target else "someone-else"
        resolved = self.pending.resolve_from(sender, invocation.invocation_id, result=1)
        assert (resolved is not None) == from_target
        if resolved is not None:
            self._deliver(invocation)

    @precondition(lambda self: self.open_calls)
    @rule(index=st.integers(0, 100))
    def time_out(self, index: int) -> None:
        invocation = list(self.open_calls.values())[index % len(self.open_calls)]
        invocation.resolve(error=None, result="timeout")
        self._deliver(invocation)

    @rule()
    def reused_invocation_id_is_refused(self) -> None:
        if not self.open_calls:
            return
        invocation = next(iter(self.open_calls.values()))
        try:
            self.pending.add(
                Invocation(
                    invocation_id=invocation.invocation_id, function_id="x", target_worker_id="y"
                )
            )
        except DuplicateInvocationError:
            return
        raise AssertionError("duplicate invocation id accepted")

    def _load_changed(self, worker_id: str, load: int) -> None:
        self.registry.set_load(worker_id, load)
        assert load == self.pending.executing_on(worker_id)
        for function_id, owner in self.places:
            if owner == worker_id:
                self.places[(function_id, owner)] = next(self.clock)

    def _deliver(self, invocation: Invocation) -> None:
        """The waiting task wakes, answers its caller once, and discards the record."""
        if invocation.invocation_id not in self.open_calls:
            return
        assert invocation.done.is_set()
        self.pending.discard(invocation)
        self.open_calls.pop(invocation.invocation_id)
        self.answers[invocation.invocation_id] += 1

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def answered_at_most_once(self) -> None:
        assert all(count <= 1 for count in self.answers.values())

    @invariant()
    def nothing_belongs_to_the_gone(self) -> None:
        live = set(self.live)
        assert set(self.registry.workers) == live
        for entry in self.registry.functions.values():
            assert entry.replicas, "a function without replicas"
            assert set(entry.replicas) <= live
            assert entry.latest is not None and entry.latest.owner in entry.replicas
        for (worker_id, _), registration in self.registry.registrations.items():
            assert worker_id in live and registration.worker_id == worker_id
        for trigger in self.registry.triggers.values():
            assert trigger.registrants, "a trigger without registrants"
            assert {w for w, _ in trigger.registrants} <= live
            for slot in trigger.registrants:
                assert slot in self.registry.registrations
        for trigger_type in self.registry.trigger_types.values():
            assert trigger_type.provider in live
        for invocation in self.pending.by_id.values():
            assert invocation.target_worker_id in live
            assert invocation.caller_worker_id in live
        assert set(self.pending.by_id) == set(self.open_calls)

    @invariant()
    def services_belong_to_the_live(self) -> None:
        table = self.registry.services
        live = set(self.live)
        held_bytes = 0
        held_count = 0
        for service_id, service in table.services.items():
            assert service.registrations, "a service without registrants"
            assert service.latest is not None and service.latest in service.registrations.values()
            if None in service.registrations:
                assert set(service.registrations) == {None}, "a module's service taken over"
            for owner, registration in service.registrations.items():
                assert owner is None or owner in live
                assert registration.id == service_id and registration.owner == owner
                held_bytes += registration.size
                held_count += 1
        assert (table.total_bytes, table.total_registrations) == (held_bytes, held_count)
        assert set(table.by_worker) <= live
        for worker_id, held in table.by_worker.items():
            assert held, "an empty per-worker index"
            for service_id, size in held.items():
                assert table.services[service_id].registrations[worker_id].size == size
        assert "mod" in table.services
        for service_id in table.claimed.values():
            assert None in table.services[service_id].registrations, "a claim by no module"
        listing = table.listing(self.registry.functions)
        grouped = [f for service in listing for f in service["functions"]]
        assert len(grouped) == len(set(grouped)) and set(grouped) <= set(self.registry.functions)
        assert {s["id"] for s in listing} >= set(table.services)

    @invariant()
    def indexes_agree(self) -> None:
        for worker_id, info in self.registry.workers.items():
            assert info.function_ids == {
                f for f, e in self.registry.functions.items() if worker_id in e.replicas
            }
            assert info.trigger_ids == {
                t for (w, t) in self.registry.registrations if w == worker_id
            }
        registered = sum(len(t.registrants) for t in self.registry.triggers.values())
        assert registered == len(self.registry.registrations)
        for worker_id, ids in self.pending.by_target.items():
            assert ids and all(self.pending.by_id[i].target_worker_id == worker_id for i in ids)
        shared: dict[str, set[str]] = {}
        for function_id, entry in self.registry.functions.items():
            queues = entry.queues
            if len(entry.replicas) < 2:
                assert queues is None
                continue
            assert queues is not None and set(queues.load) == set(entry.replicas)
            for owner, load in queues.load.items():
                assert load == self._load_of(owner)
                shared.setdefault(owner, set()).add(function_id)
            assert queues.remote_owners == set(queues.load) & set(self.remote)
            for group, owners in (
                (queues.local, set(queues.load) - queues.remote_owners),
                (queues.remote, queues.remote_owners),
            ):
                assert set(group.queues) == {queues.load[o] for o in owners}
                assert {o for q in group.queues.values() for o in q} == owners
                if group.queues:
                    assert group.least == min(group.queues)
        assert self.registry._shared == shared


TestCoreMachine = CoreMachine.TestCase
