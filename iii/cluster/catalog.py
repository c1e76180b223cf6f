"""What one engine of a cluster offers the others: its catalog, and reading a peer's.

An engine's *catalog* lists what lives on it, and only that (never what it
mirrors from peers, never the engine functions every engine has)::

    {"engine": <engine id>, "version": <int>,
     "functions": [{function_id, description, request_format, response_format, metadata}],
     "http": [{id, trigger_type, function_id, config, metadata}],  # to mirror
     "workers": [<engine::workers::list entry>],              # for introspection only
     "triggers": [{id, trigger_type, function_id, config}]}   # for introspection only

Peers fetch it with ``engine::cluster::catalog`` ``{"after": version,
"wait_ms": n}`` over their link: a long poll, answered at once when the
version differs, else when it changes or after ``wait_ms``.  Only a peer (the
cluster token's grant) may call it.

What is mirrored, and why (the one-function-space rule): functions (so a
call from any engine reaches them) and the triggers whose event arrives at
one engine: ``http`` (a request), ``stream:join`` / ``stream:leave`` (a
stream client connecting there): that engine must know them.  Event
triggers (queue, cron, state, stream, subscribe) are *not* mirrored: the
Redis adapters already deliver every event to the engine where the
trigger's worker is (state/stream changes and pubsub messages reach every
engine; queue consumer groups and cron locks hand each job and tick to one),
so mirroring them would fire them twice.  An identical fan-out trigger held
on several engines fires on one of them (``Cluster.fires_here``, using the
``triggers`` of each catalog).

A peer's catalog is peer data: :func:`read_catalog` keeps the well-formed
entries and drops the rest.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeGuard

import attrs

if TYPE_CHECKING:
    from iii.cluster import Cluster
    from iii.engine import Engine

__all__ = ["Catalog", "build_catalog", "read_catalog", "MIRRORED_TRIGGER_TYPES", "CATALOG_FUNCTION"]

CATALOG_FUNCTION = "engine::cluster::catalog"
# Triggers whose event arrives at one engine (a request, a stream client
# joining or leaving there): every engine must know them.
MIRRORED_TRIGGER_TYPES = frozenset({"http", "stream:join", "stream:leave"})
MAX_ID_CHARS = 1024


@attrs.frozen(kw_only=True)
class Catalog:
    engine: str
    version: int
    functions: dict[str, dict[str, Any]]
    http: dict[str, dict[str, Any]]
    workers: list[dict[str, Any]]
    triggers: list[dict[str, Any]]


def is_local_owner(engine: Engine, cluster: Cluster, owner: str | None) -> bool:
    """A worker of this engine: not a peer's pseudo worker, not a peer's link."""
    if owner is None or cluster.is_remote(owner):
        return False
    connection = engine.connections.get(owner)
    return connection is None or not connection.grant.cluster_peer


def build_catalog(engine: Engine, cluster: Cluster) -> dict[str, Any]:
    registry = engine.registry
    functions = []
    for function_id, entry in registry.functions.items():
        local = [r for r in entry.replicas.values() if is_local_owner(engine, cluster, r.owner)]
        if not local:
            continue
        replica = local[-1]
        functions.append(
            {
                "function_id": function_id,
                "description": replica.description,
                "request_format": replica.request_format,
                "response_format": replica.response_format,
                "metadata": replica.metadata,
            }
        )
    http = []
    triggers = []
    for trigger in registry.triggers.values():
        if not any(
            is_local_owner(engine, cluster, worker_id) for worker_id, _ in trigger.registrants
        ):
            continue
        if trigger.trigger_type in MIRRORED_TRIGGER_TYPES:
            http.append(
                {
                    "id": trigger.id,
                    "trigger_type": trigger.trigger_type,
                    "function_id": trigger.function_id,
                    "config": trigger.config,
                    "metadata": trigger.metadata,
                }
            )
        triggers.append(
            {
                "id": trigger.id,
                "trigger_type": trigger.trigger_type,
                "function_id": trigger.function_id,
                "config": trigger.config,
            }
        )
    workers = []
    for info in registry.workers.values():
        if not is_local_owner(engine, cluster, info.id):
            continue
        workers.append(info.listing(engine.pending.executing_on(info.id)))
    return {
        "engine": cluster.engine_id,
        "version": cluster.catalog_version,
        "functions": functions,
        "http": http,
        "workers": workers,
        "triggers": triggers,
        "timestamp": int(time.time() * 1000),
    }


def _short_str(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def read_catalog(value: Any, *, expected_engine: str) -> Catalog | None:
    """A peer's catalog, keeping its well-formed entries; None if it is not one."""
    if not isinstance(value, dict) or value.get("engine") != expected_engine:
        return None
    version = value.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        return None
    functions: dict[str, dict[str, Any]] = {}
    for item in _items(value.get("functions")):
        function_id = item.get("function_id")
        if not _short_str(function_id) or function_id.startswith("engine::"):
            continue
        description = item.get("description")
        metadata = item.get("metadata")
        functions[function_id] = {
            "description": description if isinstance(description, str) else None,
            "request_format": item.get("request_format"),
            "response_format": item.get("response_format"),
            "metadata": metadata if isinstance(metadata, dict) else None,
        }
    http: dict[str, dict[str, Any]] = {}
    for item in _items(value.get("http")):
        trigger_id, function_id, config = (
            item.get("id"),
            item.get("function_id"),
            item.get("config"),
        )
        trigger_type = item.get("trigger_type", "http")
        if trigger_type not in MIRRORED_TRIGGER_TYPES:
            continue
        if (
            _short_str(trigger_id)
            and _short_str(function_id)
            and isinstance(config, (dict, type(None)))
        ):
            http[trigger_id] = {
                "trigger_type": trigger_type,
                "function_id": function_id,
                "config": config,
                "metadata": item.get("metadata"),
            }
    workers = [w for w in _items(value.get("workers")) if _short_str(w.get("id"))]
    triggers = [
        {
            "id": t.get("id"),
            "trigger_type": t.get("trigger_type"),
            "function_id": t.get("function_id"),
            "config": t.get("config"),
        }
        for t in _items(value.get("triggers"))
        if _short_str(t.get("id"))
        and _short_str(t.get("trigger_type"))
        and _short_str(t.get("function_id"))
    ]
    return Catalog(
        engine=expected_engine,
        version=version,
        functions=functions,
        http=http,
        workers=workers,
        triggers=triggers,
    )


def _items(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]
