"""State: ``modules::state::StateModule`` (on by default; spec modules.md §5).

Functions (inputs are objects; unknown keys are ignored):

===================== ============================= ==========================================
``state::set``        ``{scope, key, value}``        ``{old_value, new_value}`` (``data`` is an
                                                     alias of ``value``)
``state::get``        ``{scope, key}``               the value or null
``state::delete``     ``{scope, key}``               the removed value or null
``state::update``     ``{scope, key, ops}``          ``{old_value, new_value[, errors]}``
                                                     (:mod:`iii.update_ops`)
``state::list``       ``{scope}``                    the scope's values (no keys)
``state::list_groups````{}``                         ``{"groups": [sorted scopes]}``
===================== ============================= ==========================================

Trigger type ``state``: config ``{scope?, key?, condition_function_id?}``
(exact-match filters; missing or ``""`` = any).  Each write makes an event::

    {"type": "state", "event_type": "state:created|state:updated|state:deleted",
     "scope": …, "key": …, "old_value": …, "new_value": …}

``created`` when there was no old value, ``updated`` otherwise (also when the
value did not change), ``deleted`` on every delete, even of a missing key
(v0.4).  Triggers fire after the write has answered, in the module's nursery
(:mod:`iii.modules._events`).  With a shared backend (Redis) the event also
goes to the other engines, and each engine fires the triggers its own
workers registered: a ``state::set`` through engine A reaches a trigger whose
worker is connected to engine B.

Differences from v0.4: ``state::delete`` is atomic (v0.4 did a get then a
delete); the update ops' arithmetic quirks are fixed (see
:mod:`iii.update_ops`); a backend outage answers ``adapter_unavailable``.
Other backend failures answer upstream's codes (``SET_ERROR``, ``GET_ERROR``
…).

Config: ``adapter`` (default ``modules::state::adapters::KvStore``, in
memory); see :mod:`iii.adapters.state`.  ``max_value_bytes`` (default 16 MiB,
upstream HEAD's key): a write whose value would encode larger is refused
with ``VALUE_TOO_LARGE`` before anything changes, for ``state::update`` too
(HEAD checks only ``state::set``).  A write whose answer would not fit the
caller's frames (1 MiB for a 0.4.1 worker) is refused with
``payload_too_large``, unapplied (:mod:`iii.adapters.limits`).

Lifetime: :meth:`Module.run` opens the adapter, registers the functions and
the trigger type, and runs the trigger dispatcher and the peer publisher in
its nursery until cancelled; the adapter closes last.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.adapters.limits import DEFAULT_MAX_VALUE_BYTES, WriteLimits, positive_bytes
from iii.adapters.state import StateAdapter, StateAdapterRef, open_state_adapter
from iii.errors import IIIError
from iii.grants import TriggerAccess
from iii.modules import ModuleStatistics
from iii.modules._events import PeerPublisher, TriggerDispatch, config_str
from iii.modules._functions import Empty, adapter_call, register_functions
from iii.modules.conditions import CHANGE_CONDITION_KEYS
from iii.native import CallContext, parse_input
from iii.update_ops import parse_ops

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module", "state_event"]

log = logging.getLogger(__name__)

_MISSING: Any = object()


@attrs.frozen(kw_only=True)
class Config:
    adapter: StateAdapterRef = attrs.field(factory=StateAdapterRef.default)
    max_value_bytes: int = attrs.field(default=DEFAULT_MAX_VALUE_BYTES, validator=positive_bytes)


@attrs.frozen(kw_only=True)
class ScopeKey:
    scope: str
    key: str


@attrs.frozen(kw_only=True)
class SetInput:
    scope: str
    key: str
    value: Any = _MISSING
    data: Any = _MISSING


@attrs.frozen(kw_only=True)
class UpdateInput:
    scope: str
    key: str
    ops: Any


@attrs.frozen(kw_only=True)
class ScopeInput:
    scope: str


def state_event(
    event_type: str, scope: str, key: str, old_value: Any, new_value: Any
) -> dict[str, Any]:
    return {
        "type": "state",
        "event_type": event_type,
        "scope": scope,
        "key": key,
        "old_value": old_value,
        "new_value": new_value,
    }


# A state trigger names its condition, and hands out the values of its scope
# (every scope without one): a token needs state::get or a state(scope) entry.
STATE_TRIGGER_ACCESS = TriggerAccess(
    function_keys=CHANGE_CONDITION_KEYS,
    data=True,
    resource_key="scope",
    read_function="state::get",
)


def _parse_filter(config: Any) -> tuple[str | None, str | None]:
    return config_str(config, "scope", "state"), config_str(config, "key", "state")


def _matches(filter_: tuple[str | None, str | None], event: dict[str, Any]) -> bool:
    scope, key = filter_
    return (scope is None or scope == event["scope"]) and (key is None or key == event["key"])


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.dispatch = TriggerDispatch(engine, "state", parse=_parse_filter, matches=_matches)
        self.peers = PeerPublisher("state")
        self.adapter: StateAdapter | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_state_adapter(
            self.config.adapter, on_peer_event=self.dispatch.submit
        ) as adapter:
            self.adapter = adapter
            register_functions(
                self.engine,
                "state::",
                [
                    ("set", self.set, "Set a value in state"),
                    ("get", self.get, "Get a value from state"),
                    ("delete", self.delete, "Delete a value from state"),
                    ("update", self.update, "Update a value in state with atomic operations"),
                    ("list", self.list, "List the values of a scope"),
                    ("list_groups", self.list_groups, "List the scopes"),
                ],
            )
            self.engine.register_trigger_type(
                "state", self.dispatch, description="State changes", access=STATE_TRIGGER_ACCESS
            )
            async with trio.open_nursery() as module_nursery:
                module_nursery.start_soon(self.dispatch.run)
                module_nursery.start_soon(self.peers.run, adapter.publish_event)
                task_status.started()
                await trio.sleep_forever()

    # -- events ----------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        self.dispatch.submit(event)
        self.peers.submit(event)

    # -- functions --------------------------------------------------------------------

    async def _call(self, code: str, operation: Awaitable[Any]) -> Any:
        return await adapter_call(log, code, operation)

    def _limits(self, ctx: CallContext) -> WriteLimits:
        return WriteLimits.for_call(self.config.max_value_bytes, ctx)

    async def set(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, SetInput, ctx.function_id)
        value = args.value if args.value is not _MISSING else args.data
        if value is _MISSING:
            raise IIIError(
                f"Failed to deserialize input for {ctx.function_id}: missing field value",
                code="deserialization_error",
            )
        assert self.adapter is not None
        old = await self._call(
            "SET_ERROR", self.adapter.set(args.scope, args.key, value, self._limits(ctx))
        )
        self._emit(
            state_event(
                "state:created" if old is None else "state:updated",
                args.scope,
                args.key,
                old,
                value,
            )
        )
        return {"old_value": old, "new_value": value}

    async def get(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, ScopeKey, ctx.function_id)
        assert self.adapter is not None
        return await self._call("GET_ERROR", self.adapter.get(args.scope, args.key))

    async def delete(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, ScopeKey, ctx.function_id)
        assert self.adapter is not None
        old = await self._call(
            "DELETE_ERROR", self.adapter.delete(args.scope, args.key, self._limits(ctx))
        )
        self._emit(state_event("state:deleted", args.scope, args.key, old, None))
        return old

    async def update(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, UpdateInput, ctx.function_id)
        ops = parse_ops(args.ops, ctx.function_id)
        assert self.adapter is not None
        result = await self._call(
            "UPDATE_ERROR", self.adapter.update(args.scope, args.key, ops, self._limits(ctx))
        )
        event_type = "state:created" if result.old_value is None else "state:updated"
        self._emit(
            state_event(event_type, args.scope, args.key, result.old_value, result.new_value)
        )
        return result.to_json()

    async def list(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, ScopeInput, ctx.function_id)
        assert self.adapter is not None
        return await self._call("LIST_ERROR", self.adapter.list(args.scope))

    async def list_groups(self, data: Any, ctx: CallContext) -> Any:
        parse_input(data, Empty, ctx.function_id)
        assert self.adapter is not None
        return {"groups": await self._call("LIST_GROUPS_ERROR", self.adapter.list_groups())}

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
