"""The service registry: named groups of functions, owned by workers or modules.

Pure and synchronous, like :mod:`iii.registry` (which holds one
:class:`ServiceTable` and removes a worker's services with the worker).

* **Worker services** come from ``registerservice`` (``id``, ``name``
  defaulting to ``id``, ``description``, ``parent_service_id``).  Several
  workers may register the same id (replicas of one worker program): the
  service lives while any of them is connected and shows the latest
  registration, as a function shows its latest replica.  Re-registering
  replaces the worker's own entry (the SDKs replay their services on
  reconnect).  With tokens, the connection checks that the token may
  register functions ``<id>::...`` first.
* **Module services** are registered by the engine for each module it runs
  (:data:`MODULE_SERVICES`), once the module has started; a worker cannot
  take one over.  A module service lists the engine functions the module
  registered while starting, whatever their ids (``enqueue``,
  ``engine::queue::*`` and ``iii::queue::*`` are the queue module's).
* **Grouping.**  Upstream files a function under the part of its id before
  the first ``::`` (``services.rs``, ``register_service_from_function_id``)
  and creates that service if nobody registered it.  Here a function a
  module registered goes to that module's service; any other goes to the
  longest registered service id that is a ``::``-prefix of its id
  (``payments::refunds::create`` goes to ``payments::refunds`` when that is
  registered, the sub-service layout the 0.9.0 SDK documents), else to its
  first segment, listed as an *implicit* service without an owner, as
  upstream creates it.  An id without ``::`` belongs to no service, as
  upstream.  Grouping is computed when listed, so it never goes stale.
* **Bounds.**  A hostile worker cannot grow the table without limit: a
  registration takes at most :data:`MAX_SERVICE_BYTES` (its strings in UTF-8
  plus :data:`REGISTRATION_OVERHEAD`), a worker holds at most
  :data:`MAX_SERVICES_PER_WORKER` services and
  :data:`MAX_SERVICE_BYTES_PER_WORKER` bytes of them, and all workers
  together :data:`MAX_SERVICES_TOTAL` and :data:`MAX_SERVICE_BYTES_TOTAL`.  A
  registration past a bound is refused with :class:`ServiceRefusedError` and
  changes nothing.

Lifetime: lives as long as the engine's registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from iii.modules import MODULE_SPECS
from iii.protocol import RegisterService

__all__ = [
    "MAX_SERVICE_BYTES",
    "MAX_SERVICES_PER_WORKER",
    "MAX_SERVICE_BYTES_PER_WORKER",
    "MAX_SERVICES_TOTAL",
    "MAX_SERVICE_BYTES_TOTAL",
    "REGISTRATION_OVERHEAD",
    "MODULE_SERVICES",
    "ServiceRegistration",
    "Service",
    "ServiceTable",
    "ServiceRefusedError",
    "service_ids_of",
    "module_service",
]

KiB = 1024
MAX_SERVICE_BYTES = 16 * KiB
MAX_SERVICES_PER_WORKER = 1024
MAX_SERVICE_BYTES_PER_WORKER = 1024 * KiB
MAX_SERVICES_TOTAL = 65_536
MAX_SERVICE_BYTES_TOTAL = 64 * 1024 * KiB
# What one registration costs beyond its strings' bytes (its objects and
# table entries, and the strings' object headers; see the README), so the byte bounds
# track memory, not only what the peer sent.
REGISTRATION_OVERHEAD = 640

# Engine module name (iii.modules.ModuleSpec.name) -> (service id, description).
# The descriptions are upstream HEAD's (``register_worker!`` in engine/src/workers).
MODULE_SERVICES: Mapping[str, tuple[str, str]] = {
    "worker": (
        "engine",
        "Core engine introspection (engine::*): workers, functions, triggers, services, channels.",
    ),
    "telemetry": ("telemetry", "Anonymous usage telemetry and heartbeat reporting for the engine."),
    "rest_api": ("rest_api", "Expose functions as HTTP endpoints."),
    "queue": ("queue", "Async job processing with named queues, retries, and dead-letter support."),
    "cron": ("cron", "Schedule functions with cron expressions."),
    "stream": ("stream", "Build durable streams for real-time data subscriptions."),
    "state": ("state", "Distributed key-value state management with reactive change triggers."),
    "pubsub": (
        "pubsub",
        "Topic-based publish/subscribe messaging for real-time event distribution.",
    ),
    "kv_server": ("kv_server", "Key-value store served to workers (kv_server::*)."),
    "observability": ("observability", "OpenTelemetry-based traces, metrics, logs and sampling."),
    "http_functions": ("http_functions", "Call external HTTP endpoints as functions."),
    "exec": ("exec", "Execute shell commands as part of engine startup."),
}


class ServiceRefusedError(Exception):
    """A ``registerservice`` the table refuses; nothing was changed."""


def _size(*texts: str | None) -> int:
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts if text)


@attrs.frozen(kw_only=True)
class ServiceRegistration:
    """One ``registerservice`` (or a module's service)."""

    id: str
    name: str
    description: str | None = None
    parent_service_id: str | None = None
    owner: str | None = None  # worker id; None for a module
    module: str | None = None  # the module's config class name, for a module service
    # A module service: the engine functions the module registered.
    functions: frozenset[str] = frozenset()

    @classmethod
    def of(cls, message: RegisterService, owner: str) -> ServiceRegistration:
        """A worker's ``registerservice``; ``name`` defaults to ``id`` (0.4.1 sends none)."""
        return cls(
            id=message.id,
            name=message.name or message.id,
            description=message.description,
            parent_service_id=message.parent_service_id,
            owner=owner,
        )

    @property
    def size(self) -> int:
        """Bytes this registration holds: its strings (UTF-8) and a fixed overhead."""
        return REGISTRATION_OVERHEAD + _size(
            self.id, self.name, self.description, self.parent_service_id
        )


@attrs.define(eq=False)
class Service:
    id: str
    registrations: dict[str | None, ServiceRegistration] = attrs.field(factory=dict)
    latest: ServiceRegistration | None = None


def module_service(name: str, functions: Iterable[str] = ()) -> ServiceRegistration | None:
    """The service of a started module, by its name in ``engine.modules`` (``exec:<instance>``).

    ``functions``: the engine functions it registered while starting.
    """
    base, _, instance = name.partition(":")
    known = MODULE_SERVICES.get(base)
    if known is None:
        return None
    service_id, description = known
    if instance:
        service_id = f"{service_id}:{instance}"
    class_name = next((c for c, spec in MODULE_SPECS.items() if spec.name == base), base)
    return ServiceRegistration(
        id=service_id,
        name=service_id,
        description=description,
        module=class_name,
        functions=frozenset(functions),
    )


def service_ids_of(function_id: str) -> list[str]:
    """The ``::``-prefixes of ``function_id``, longest first (``a::b::c`` -> ``a::b``, ``a``)."""
    parts = function_id.split("::")
    return ["::".join(parts[:end]) for end in range(len(parts) - 1, 0, -1)]


@attrs.define(eq=False)
class ServiceTable:
    services: dict[str, Service] = attrs.field(factory=dict)
    # worker id -> {service id: bytes held}
    by_worker: dict[str, dict[str, int]] = attrs.field(factory=dict)
    total_bytes: int = 0
    total_registrations: int = 0
    # function id -> the module service that registered it
    claimed: dict[str, str] = attrs.field(factory=dict)

    def add(self, registration: ServiceRegistration) -> bool:
        """File a registration; True if the id is new.  Raises :class:`ServiceRefusedError`."""
        service_id = registration.id
        if not service_id:
            raise ServiceRefusedError("a service id must not be empty")
        size = registration.size
        if size > MAX_SERVICE_BYTES:
            raise ServiceRefusedError(
                f"service takes {size} bytes (id, name, description, parent); at most "
                f"{MAX_SERVICE_BYTES}"
            )
        service = self.services.get(service_id)
        owner = registration.owner
        if service is not None and owner is not None and None in service.registrations:
            raise ServiceRefusedError(f"service {service_id!r} belongs to an engine module")
        if service is not None and owner is None and service.registrations:
            raise ServiceRefusedError(f"service {service_id!r} is already registered")
        held = self.by_worker.get(owner, {}) if owner is not None else {}
        previous = held.get(service_id, 0)
        replacing = service_id in held
        if owner is not None:
            if not replacing and len(held) >= MAX_SERVICES_PER_WORKER:
                raise ServiceRefusedError(
                    f"worker holds {len(held)} services; at most {MAX_SERVICES_PER_WORKER}"
                )
            worker_bytes = sum(held.values()) - previous + size
            if worker_bytes > MAX_SERVICE_BYTES_PER_WORKER:
                raise ServiceRefusedError(
                    f"worker's services would take {worker_bytes} bytes; at most "
                    f"{MAX_SERVICE_BYTES_PER_WORKER}"
                )
        if not replacing and self.total_registrations >= MAX_SERVICES_TOTAL:
            raise ServiceRefusedError(f"the engine holds {MAX_SERVICES_TOTAL} services")
        if self.total_bytes - previous + size > MAX_SERVICE_BYTES_TOTAL:
            raise ServiceRefusedError(
                f"services would take more than {MAX_SERVICE_BYTES_TOTAL} bytes in all"
            )
        created = service is None
        if service is None:
            service = self.services[service_id] = Service(service_id)
        service.registrations.pop(owner, None)  # re-registered: now the latest
        service.registrations[owner] = registration
        service.latest = registration
        self.total_bytes += size - previous
        if not replacing:
            self.total_registrations += 1
        if owner is not None:
            self.by_worker.setdefault(owner, {})[service_id] = size
        for function_id in registration.functions:
            self.claimed[function_id] = service_id
        return created

    def remove(self, owner: str | None, service_id: str) -> bool:
        """Drop ``owner``'s registration; True if the service is now gone."""
        service = self.services.get(service_id)
        if service is None:
            return False
        registration = service.registrations.pop(owner, None)
        if registration is None:
            return False
        if owner is not None:
            held = self.by_worker.get(owner, {})
            held.pop(service_id, None)
            if not held:
                self.by_worker.pop(owner, None)
        self.total_bytes -= registration.size
        self.total_registrations -= 1
        for function_id in registration.functions:
            if self.claimed.get(function_id) == service_id:
                del self.claimed[function_id]
        if service.registrations:
            if service.latest is registration:
                service.latest = next(reversed(service.registrations.values()))
            return False
        del self.services[service_id]
        return True

    def remove_worker(self, worker_id: str) -> list[str]:
        """Drop everything ``worker_id`` registered; returns the service ids now gone."""
        held = list(self.by_worker.get(worker_id, {}))
        return [service_id for service_id in held if self.remove(worker_id, service_id)]

    def service_of(self, function_id: str) -> str | None:
        """The service a function is listed under (see the module docstring)."""
        claimed = self.claimed.get(function_id)
        if claimed is not None:
            return claimed
        prefixes = service_ids_of(function_id)
        for prefix in prefixes:
            if prefix in self.services:
                return prefix
        return prefixes[-1] if prefixes else None

    def listing(self, function_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Every service, registered or implicit, with its functions: ``engine::services::list``."""
        members: dict[str, list[str]] = {}
        for function_id in function_ids:
            service_id = self.service_of(function_id)
            if service_id is not None:
                members.setdefault(service_id, []).append(function_id)
        listed = []
        for service_id in sorted(set(self.services) | set(members)):
            service = self.services.get(service_id)
            latest = service.latest if service is not None else None
            if latest is None:
                owner: dict[str, str] | None = None
                worker_ids: list[str] = []
            elif latest.owner is None:
                owner = {"type": "module", "id": latest.module or ""}
                worker_ids = []
            else:
                owner = {"type": "worker", "id": latest.owner}
                assert service is not None
                worker_ids = [w for w in service.registrations if w is not None]
            listed.append(
                {
                    "id": service_id,
                    "name": latest.name if latest is not None else service_id,
                    "description": latest.description if latest is not None else None,
                    "parent_service_id": latest.parent_service_id if latest is not None else None,
                    "owner": owner,
                    "worker_ids": worker_ids,
                    "implicit": latest is None,
                    "functions": sorted(members.get(service_id, [])),
                }
            )
        return listed
