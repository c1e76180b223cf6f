"""The mandatory worker module: the engine's own functions and trigger types.

Functions (spec protocol.md §4.1): ``engine::workers::register``,
``engine::workers::list``, ``engine::functions::list``,
``engine::triggers::list`` and ``engine::channels::create``; and
``engine::services::list`` (:mod:`iii.services`; upstream has no such
function: its shape follows ``engine::workers::list``).

In a cluster (:mod:`iii.cluster`) the three lists cover every engine, each
entry with the ``engine`` it lives on (functions also list ``engines``: all
engines with a replica); ``{"local_only": true}`` lists this engine's only.
The keys the SDKs parse are unchanged.

Trigger types: ``engine::workers-available`` (``worker_connected`` /
``worker_disconnected`` / ``worker_metadata_updated``) and
``engine::functions-available`` (``functions_changed`` with every function).
Upstream polls the function set every 5 s; here a change is reported after a
short debounce (``functions_debounce``), so bursts of registrations at
connect time give one event.

Lifetime: :meth:`Module.run` owns the trigger fan-out tasks and the channel
sweep (every 60 s) in its own nursery.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.containment import start_contained
from iii.errors import IIIError
from iii.grants import TriggerAccess
from iii.modules import ModuleStatistics
from iii.native import CallContext
from iii.registry import LogicalTrigger

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module", "format_tree_or_none"]

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 60.0
# Both types hand out what the list functions show: a token needs that function.
WORKERS_TRIGGER_ACCESS = TriggerAccess(data=True, read_function="engine::workers::list")
FUNCTIONS_TRIGGER_ACCESS = TriggerAccess(data=True, read_function="engine::functions::list")


@attrs.frozen(kw_only=True)
class Config:
    functions_debounce_ms: int = 200


def format_tree_or_none(value: Any) -> Any:
    """Keep a request/response format only in 0.4.1's "format tree" shape.

    0.4.1 parses ``engine::functions::list`` with pydantic; a JSON Schema that
    a 0.25 worker registered would make it raise (spec protocol.md §6.4).
    """
    return value if _is_format_tree(value) else None


def _is_format_tree(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    if not isinstance(value.get("name"), str) or not isinstance(value.get("type"), str):
        return False
    if not isinstance(value.get("description"), (str, type(None))):
        return False
    if not isinstance(value.get("required", False), bool):
        return False
    body = value.get("body")
    if body is not None and not (isinstance(body, list) and all(_is_format_tree(b) for b in body)):
        return False
    items = value.get("items")
    return items is None or _is_format_tree(items)


def _local_only(data: Any) -> bool:
    """``{"local_only": true}``: this engine's entries only, not the cluster's."""
    return isinstance(data, dict) and data.get("local_only") is True


class _TriggerSet:
    """A trigger type whose triggers are kept in a set and fired by the module."""

    def __init__(self) -> None:
        self.triggers: set[LogicalTrigger] = set()

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        self.triggers.add(trigger)

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        self.triggers.discard(trigger)


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.worker_triggers = _TriggerSet()
        self.function_triggers = _TriggerSet()
        self._functions_changed = trio.Event()
        self._events_send, self._events_receive = trio.open_memory_channel[tuple[str, str]](1024)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        engine = self.engine
        functions = {
            "engine::workers::register": (self.workers_register, "Report a worker's metadata"),
            "engine::workers::list": (self.workers_list, "List connected workers"),
            "engine::functions::list": (self.functions_list, "List registered functions"),
            "engine::triggers::list": (self.triggers_list, "List registered triggers"),
            "engine::services::list": (self.services_list, "List services and their functions"),
            "engine::channels::create": (self.channels_create, "Create a streaming channel"),
        }
        for function_id, (handler, description) in functions.items():
            engine.register_function(function_id, handler, description=description)
        engine.register_trigger_type(
            "engine::workers-available",
            self.worker_triggers,
            description="Worker connect/disconnect",
            access=WORKERS_TRIGGER_ACCESS,
        )
        engine.register_trigger_type(
            "engine::functions-available",
            self.function_triggers,
            description="Function set changes",
            access=FUNCTIONS_TRIGGER_ACCESS,
        )
        with engine.listening(workers=self._on_worker_event, functions=self._on_functions_changed):
            async with trio.open_nursery() as module_nursery:
                module_nursery.start_soon(self._fan_out_worker_events)
                module_nursery.start_soon(self._fan_out_function_changes)
                module_nursery.start_soon(self._sweep_channels)
                task_status.started()

    # -- functions -------------------------------------------------------------

    async def workers_register(self, data: Any, ctx: CallContext) -> Any:
        if not isinstance(data, dict):
            raise IIIError(
                "Failed to deserialize input for engine::workers::register: expected an object",
                code="deserialization_error",
            )
        worker_id = ctx.caller_worker_id
        connection = self.engine.connections.get(worker_id or "")
        if connection is not None:
            connection.apply_metadata(data)
            self.engine.notify_worker("worker_metadata_updated", connection.worker_id)
        return {"success": True}

    async def workers_list(self, data: Any, ctx: CallContext) -> Any:
        wanted = data.get("worker_id") if isinstance(data, dict) else None
        local_only = _local_only(data)
        pending = self.engine.pending
        cluster = self.engine.cluster
        workers = []
        for info in self.engine.registry.workers.values():
            if wanted is not None and info.id != wanted:
                continue
            if cluster is not None and (
                cluster.is_remote(info.id) or cluster.is_peer_link(info.id)
            ):
                continue  # a peer engine's stand-in or link: its workers are listed below
            listed = info.listing(pending.executing_on(info.id))
            if cluster is not None:
                listed["engine"] = cluster.engine_id
            workers.append(listed)
        if cluster is not None and not local_only:
            workers.extend(
                w for w in cluster.remote_workers() if wanted is None or w.get("id") == wanted
            )
        return {"workers": workers, "timestamp": int(time.time() * 1000)}

    def _function_infos(
        self, include_internal: bool, local_only: bool = False
    ) -> list[dict[str, Any]]:
        infos = []
        cluster = self.engine.cluster
        for function_id, entry in self.engine.registry.functions.items():
            if not include_internal and function_id.startswith("engine::"):
                continue
            engines: list[str] = []
            if cluster is not None:
                engines = sorted({cluster.engine_of(owner) for owner in entry.replicas})
                if local_only and cluster.engine_id not in engines:
                    continue
            latest = entry.latest
            metadata = latest.metadata if latest is not None else None
            infos.append(
                {
                    "function_id": function_id,
                    "description": latest.description if latest is not None else None,
                    "request_format": format_tree_or_none(
                        latest.request_format if latest else None
                    ),
                    "response_format": format_tree_or_none(
                        latest.response_format if latest else None
                    ),
                    "metadata": metadata if isinstance(metadata, dict) else None,
                }
            )
            if cluster is not None:
                # The engine it lives on (this one first), and every engine with a replica.
                here = cluster.engine_id in engines
                infos[-1]["engine"] = cluster.engine_id if here else engines[0]
                infos[-1]["engines"] = engines
        return infos

    async def functions_list(self, data: Any, ctx: CallContext) -> Any:
        include_internal = isinstance(data, dict) and data.get("include_internal") is True
        return {"functions": self._function_infos(include_internal, _local_only(data))}

    async def services_list(self, data: Any, ctx: CallContext) -> Any:
        registry = self.engine.registry
        return {"services": registry.services.listing(registry.functions)}

    async def triggers_list(self, data: Any, ctx: CallContext) -> Any:
        include_internal = isinstance(data, dict) and data.get("include_internal") is True
        cluster = self.engine.cluster
        triggers = []
        for trigger in self.engine.registry.triggers.values():
            if not include_internal and trigger.trigger_type.startswith("engine::"):
                continue
            if cluster is not None and all(cluster.is_remote(w) for w, _ in trigger.registrants):
                continue  # mirrored from a peer: listed with the peer's triggers below
            triggers.append(
                {
                    "id": trigger.id,
                    "trigger_type": trigger.trigger_type,
                    "function_id": trigger.function_id,
                    "config": trigger.config,
                    **({"engine": cluster.engine_id} if cluster is not None else {}),
                }
            )
        if cluster is not None and not _local_only(data):
            triggers.extend(
                t
                for t in cluster.remote_triggers()
                if include_internal or not str(t.get("trigger_type")).startswith("engine::")
            )
        return {"triggers": triggers}

    async def channels_create(self, data: Any, ctx: CallContext) -> Any:
        buffer_size = data.get("buffer_size") if isinstance(data, dict) else None
        channel = self.engine.channels.create_for_worker(buffer_size)  # max_channels
        return {"writer": channel.ref("write"), "reader": channel.ref("read")}

    # -- trigger fan-out ---------------------------------------------------------

    def _on_functions_changed(self) -> None:
        self._functions_changed.set()

    def _on_worker_event(self, event: str, worker_id: str) -> None:
        if not self.worker_triggers.triggers:
            return
        try:
            self._events_send.send_nowait((event, worker_id))
        except trio.WouldBlock:
            log.warning("engine::workers-available: event queue full, %s dropped", event)

    async def _fan_out_worker_events(self) -> None:
        async with trio.open_nursery() as calls:
            async for event, worker_id in self._events_receive:
                payload = {"event": event, "worker_id": worker_id}
                for trigger in list(self.worker_triggers.triggers):
                    start_contained(
                        calls,
                        f"engine::workers-available trigger {trigger.function_id!r}",
                        partial(
                            self.engine.invoke_logged,
                            what="engine::workers-available",
                            grant=trigger.grant,
                        ),
                        trigger.function_id,
                        dict(payload),
                    )

    async def _fan_out_function_changes(self) -> None:
        debounce = self.config.functions_debounce_ms / 1000
        last_sent: frozenset[str] | None = None
        async with trio.open_nursery() as calls:
            while True:
                await self._functions_changed.wait()
                await trio.sleep(debounce)
                self._functions_changed = trio.Event()
                current = frozenset(self.engine.registry.functions)
                if current == last_sent or not self.function_triggers.triggers:
                    last_sent = current
                    continue
                last_sent = current
                payload = {"event": "functions_changed", "functions": self._function_infos(True)}
                for trigger in list(self.function_triggers.triggers):
                    start_contained(
                        calls,
                        f"engine::functions-available trigger {trigger.function_id!r}",
                        partial(
                            self.engine.invoke_logged,
                            what="engine::functions-available",
                            grant=trigger.grant,
                        ),
                        trigger.function_id,
                        dict(payload),
                    )

    async def _sweep_channels(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            removed = self.engine.channels.sweep(trio.current_time())
            if removed:
                log.debug("channel sweep removed %d channels", removed)

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
