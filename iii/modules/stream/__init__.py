"""Stream: ``modules::stream::StreamModule`` (on by default; spec modules.md §4).

Data model ``stream_name -> group_id -> item_id -> JSON``, kept by an adapter
(:mod:`iii.adapters.stream`), with live updates pushed to WebSocket clients
(:mod:`.server`, default port 3112).

Functions (inputs are objects):

======================= ============================================== ===============================
``stream::set``         ``{stream_name, group_id, item_id, data}``      ``{old_value, new_value}``;
                                                                        event ``create`` if there was
                                                                        no old value, else ``update``
``stream::get``         ``{stream_name, group_id, item_id}``            the value or null
``stream::delete``      ``{stream_name, group_id, item_id}``            ``{old_value}``; event
                                                                        ``delete`` (data = old value)
                                                                        only if something was removed
``stream::update``      ``{stream_name, group_id, item_id, ops}``       ``{old_value, new_value[, errors]}``
``stream::list``        ``{stream_name, group_id}``                     the group's values
``stream::list_groups`` ``{stream_name}``                               sorted group ids (bare array)
``stream::list_all``    ``{}``                                          ``{"stream": [{"id", "groups"}],
                                                                        "count"}``, sorted by id
``stream::send``        ``{stream_name, group_id, id?, type, data}``    null; pushes a custom ``event``
                                                                        without storing anything
======================= ============================================== ===============================

Per-stream overrides: when a worker registered ``stream::<op>(<stream_name>)``
(``set``, ``get``, ``delete``, ``list``, ``list_groups``, ``update``; SDK
``create_stream``), the builtin calls it with the same input instead of the
adapter; events and triggers still follow set/update/delete.  A delete hook
returning null counts as "nothing removed" (the 0.4.1 SDK's hooks return
nothing).

Trigger types:

* ``stream``: config ``{stream_name (required), group_id?, item_id?,
  condition_function_id?}``; ``""`` means any.  The handler gets the same
  message the clients get (``type: "stream"``, ``event.type`` create/update/
  delete/event).  The condition gets it too; ``false``, ``null`` or an error
  skips.  Triggers of one event run one after another, after the write has
  answered (:mod:`iii.modules._events`).
* ``stream:join`` / ``stream:leave``: config ``{stream_name?}`` (ours: only
  that stream's clients; upstream ignores the config); payload
  ``{subscription_id, stream_name, group_id, id, context}``.  A join trigger
  answering ``{"unauthorized": true}`` refuses the join.

With a shared backend (Redis) every message also goes to the other engines:
their clients get it, and their ``stream`` triggers fire (v0.4 fired triggers
only on the engine that made the write).

Config: ``port`` (3112), ``host`` (``0.0.0.0``), ``auth_function`` (a failed
auth refuses the upgrade with 401, see :mod:`.server`), ``auth_timeout_ms``
(ours, 5000: how long the auth function may take), ``auth_required`` (ours,
kept for old configs: with an ``auth_function`` a failed auth always refuses),
``adapter`` (default ``modules::stream::adapters::KvStore``, in memory),
``max_value_bytes`` (default 16 MiB): a stored item that would encode larger
is refused with ``VALUE_TOO_LARGE``, and a write whose answer would not fit
the caller's frames with ``payload_too_large``, both before anything changes
(:mod:`iii.adapters.limits`); ``max_connections`` (4096 upgraded client
sockets; more get HTTP 503) and ``max_connections_per_address`` (128 client
sockets per peer address, counted from accept; more are refused at once),
and ``max_inbound_bytes`` (16 MiB: what all client sockets together may hold
of their messages, past a few KiB each; a share of the engine's
``max_inbound_bytes``, so clients cannot take the workers' room), all ours.
Error codes: ``STREAM_SET_ERROR`` (also for update), ``STREAM_GET_ERROR``,
``STREAM_DELETE_ERROR``, ``STREAM_GET_GROUP_ERROR``,
``STREAM_LIST_GROUPS_ERROR``, ``STREAM_LIST_ALL_ERROR``, ``STREAM_SEND_ERROR``
for backend failures; ``adapter_unavailable`` for a backend outage.

Lifetime: :meth:`Module.run` opens the adapter, starts the client server,
the trigger dispatcher and the peer publisher in its nursery, and runs until
cancelled; the adapter closes last.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.adapters.limits import DEFAULT_MAX_VALUE_BYTES, WriteLimits, positive_bytes
from iii.adapters.stream import StreamAdapter, StreamAdapterRef, open_stream_adapter
from iii.admission import ConnectionLimits
from iii.config_schema import Count, FieldValueError
from iii.errors import IIIError, TriggerRegistrationError
from iii.grants import Grant, TriggerAccess
from iii.modules import ModuleStatistics
from iii.modules._events import PeerPublisher, TriggerDispatch, config_str
from iii.modules._functions import Empty, adapter_call, register_functions
from iii.modules.conditions import CHANGE_CONDITION_KEYS
from iii.modules.stream.server import MAX_CLIENT_MESSAGE, StreamServer, stream_message
from iii.native import CallContext, parse_input
from iii.registry import LogicalTrigger
from iii.security import server_ssl_context
from iii.update_ops import UpdateResult, parse_ops

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
OVERRIDE_OPS = ("set", "get", "delete", "list", "list_groups", "update")
_OVERRIDE = re.compile(r"^stream::(?:" + "|".join(OVERRIDE_OPS) + r")\(.*\)$", re.DOTALL)
# A stream trigger names its condition and hands out the items of its stream:
# a token needs stream::get or a stream(stream-pattern) entry.
STREAM_TRIGGER_ACCESS = TriggerAccess(
    function_keys=CHANGE_CONDITION_KEYS,
    data=True,
    resource_key="stream_name",
    read_function="stream::get",
)
# Join/leave triggers see every client's auth context and may refuse joins:
# a token needs invoke ["*"] or a stream:join(stream-pattern) entry.
JOIN_TRIGGER_ACCESS = TriggerAccess(data=True, resource_key="stream_name")


def _positive(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise FieldValueError(
            attribute.name, f"must be a positive number of milliseconds, got {value}"
        )


def _holds_a_message(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if value < MAX_CLIENT_MESSAGE:
        raise FieldValueError(
            attribute.name,
            f"must be at least one client message ({MAX_CLIENT_MESSAGE} bytes), got {value}",
        )


@attrs.frozen(kw_only=True)
class Config:
    port: int = 3112
    host: str = "0.0.0.0"
    auth_function: str | None = None
    # Milliseconds the auth function may take; past it the upgrade is refused.
    auth_timeout_ms: int = attrs.field(default=5000, validator=_positive)
    # No effect since a failed auth always refuses; accepted for old configs.
    auth_required: bool = False
    adapter: StreamAdapterRef = attrs.field(factory=StreamAdapterRef.default)
    max_value_bytes: int = attrs.field(default=DEFAULT_MAX_VALUE_BYTES, validator=positive_bytes)
    # Client sockets upgraded (more get HTTP 503 at the upgrade), and client
    # sockets from one peer address, counted from accept (more are refused
    # at once); see iii.admission.
    max_connections: Count = Count(4096)
    max_connections_per_address: Count = Count(128)
    # Bytes of client messages held at once (queued or being received) past
    # each socket's small read-ahead: a share of the engine's max_inbound_bytes
    # (iii.inbound), so that clients never take the room workers need.
    max_inbound_bytes: int = attrs.field(default=16 * MiB, validator=_holds_a_message)

    @property
    def auth_timeout(self) -> float:
        return self.auth_timeout_ms / 1000


@attrs.frozen(kw_only=True)
class ItemInput:
    stream_name: str
    group_id: str
    item_id: str


@attrs.frozen(kw_only=True)
class SetInput:
    stream_name: str
    group_id: str
    item_id: str
    data: Any = None


@attrs.frozen(kw_only=True)
class UpdateInput:
    stream_name: str
    group_id: str
    item_id: str
    ops: Any


@attrs.frozen(kw_only=True)
class GroupInput:
    stream_name: str
    group_id: str


@attrs.frozen(kw_only=True)
class StreamInput:
    stream_name: str


@attrs.frozen(kw_only=True)
class SendInput:
    stream_name: str
    group_id: str
    type: str
    id: str | None = None
    data: Any = None


@attrs.frozen(kw_only=True)
class TriggerFilter:
    stream_name: str
    group_id: str | None
    item_id: str | None


def _parse_filter(config: Any) -> TriggerFilter:
    stream_name = config_str(config, "stream_name", "stream")
    if stream_name is None:
        raise TriggerRegistrationError("stream trigger config needs stream_name")
    return TriggerFilter(
        stream_name=stream_name,
        group_id=config_str(config, "group_id", "stream"),
        item_id=config_str(config, "item_id", "stream"),
    )


def _matches(filter_: TriggerFilter, message: dict[str, Any]) -> bool:
    return (
        filter_.stream_name == message["streamName"]
        and (filter_.group_id is None or filter_.group_id == message["groupId"])
        and (filter_.item_id is None or filter_.item_id == message["id"])
    )


class _JoinTriggers:
    """``stream:join`` / ``stream:leave``: config ``{stream_name?}`` (ours; missing
    or ``""`` = every stream, upstream ignores the config)."""

    def __init__(self, trigger_type: str) -> None:
        self.trigger_type = trigger_type
        self.triggers: dict[LogicalTrigger, str | None] = {}

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        # Upstream ignores this config: anything but an object still means every stream.
        config = trigger.config if isinstance(trigger.config, dict) else None
        self.triggers[trigger] = config_str(config, "stream_name", self.trigger_type)

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        self.triggers.pop(trigger, None)

    def matching(self, stream_name: Any) -> list[LogicalTrigger]:
        return [t for t, wanted in self.triggers.items() if wanted in (None, stream_name)]


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.dispatch = TriggerDispatch(engine, "stream", parse=_parse_filter, matches=_matches)
        self.join_triggers = _JoinTriggers("stream:join")
        self.leave_triggers = _JoinTriggers("stream:leave")
        self.peers = PeerPublisher("stream")
        self.adapter: StreamAdapter | None = None
        self.server = StreamServer(
            host=config.host,
            port=config.port,
            authenticate=self._authenticate if config.auth_function else None,
            run_join_triggers=self._run_join_triggers,
            read_sync=self._read_sync,
            ssl_context=server_ssl_context(engine.config.tls),
            limits=ConnectionLimits(
                max_connections=config.max_connections,
                max_per_address=config.max_connections_per_address,
            ),
            inbound=engine.inbound.share(config.max_inbound_bytes, slack=MAX_CLIENT_MESSAGE),
            inbound_wait_timeout=engine.config.inbound_wait_timeout,
            listen_keys=engine.config.listen_keys(config),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_stream_adapter(
            self.config.adapter, on_peer_event=self._peer_message
        ) as adapter:
            self.adapter = adapter
            register_functions(
                self.engine,
                "stream::",
                [
                    ("set", self.set, "Set a stream item"),
                    ("get", self.get, "Get a stream item"),
                    ("delete", self.delete, "Delete a stream item"),
                    ("update", self.update, "Update a stream item with atomic operations"),
                    ("list", self.list, "List the items of a group"),
                    ("list_groups", self.list_groups, "List the groups of a stream"),
                    ("list_all", self.list_all, "List every stream and its groups"),
                    ("send", self.send, "Send a custom event to a group's subscribers"),
                ],
            )
            self.engine.register_trigger_type(
                "stream", self.dispatch, description="Stream changes", access=STREAM_TRIGGER_ACCESS
            )
            self.engine.register_trigger_type(
                "stream:join",
                self.join_triggers,
                description="Stream client joins",
                access=JOIN_TRIGGER_ACCESS,
            )
            self.engine.register_trigger_type(
                "stream:leave",
                self.leave_triggers,
                description="Stream client leaves",
                access=JOIN_TRIGGER_ACCESS,
            )
            if self.config.auth_required and not self.config.auth_function:
                log.warning("stream: auth_required without an auth_function has no effect")
            with self.engine.marking_sensitive(self._receives_others_data):
                async with trio.open_nursery() as module_nursery:
                    module_nursery.start_soon(self.dispatch.run)
                    module_nursery.start_soon(self.peers.run, adapter.publish_event)
                    await module_nursery.start(self.server.serve)
                    task_status.started()
                    await trio.sleep_forever()

    # -- events ------------------------------------------------------------------------

    def _emit(self, message: dict[str, Any]) -> None:
        """A message made here: triggers, local clients, the other engines."""
        self.dispatch.submit(message)
        self.server.deliver(message)
        self.peers.submit(message)

    def _peer_message(self, message: dict[str, Any]) -> None:
        """A message another engine made: our triggers and our clients."""
        if (
            not isinstance(message, dict)
            or not {"streamName", "groupId", "id", "event"} <= message.keys()
        ):
            log.warning("stream: ignoring a malformed message from another engine")
            return
        self.dispatch.submit(message)
        self.server.deliver(message)

    # -- client server hooks --------------------------------------------------------------

    async def _authenticate(self, auth_input: dict[str, Any]) -> tuple[Any, str | None]:
        """(context, None) or (None, why the upgrade is refused); never waits past the deadline.

        The reason names the function and the error code only: the error's
        message is the function's own and may repeat what the client sent.
        """
        function_id = self.config.auth_function
        assert function_id is not None
        timeout = self.config.auth_timeout
        # The engine's deadline for the call bounds the wait (one deadline
        # mechanism, iii.invocations), wherever the auth function runs.
        try:
            result = await self.engine.invoke(function_id, auth_input, timeout=timeout)
        except IIIError as exc:
            if exc.code == "timeout":
                return None, f"auth function {function_id!r} gave no answer within {timeout:g}s"
            return None, f"auth function {function_id!r} failed: {exc.code[:64]!r}"
        if not isinstance(result, dict):
            kind = "null" if result is None else type(result).__name__
            return None, f"auth function {function_id!r} answered {kind}, not an object"
        return result.get("context"), None

    def _receives_others_data(self, function_id: str) -> bool:
        """The auth function and the per-stream overrides (see Engine.sensitive_functions)."""
        return function_id == self.config.auth_function or _OVERRIDE.match(function_id) is not None

    async def _run_join_triggers(self, trigger_type: str, payload: dict[str, Any]) -> bool:
        """Run the join (or leave) triggers in turn; True if a join was refused."""
        triggers = self.join_triggers if trigger_type == "stream:join" else self.leave_triggers
        for trigger in triggers.matching(payload.get("stream_name")):
            function_id = trigger.function_id
            try:
                result = await self.engine.invoke(function_id, dict(payload), grant=trigger.grant)
            except IIIError as exc:
                log.warning(
                    "%s trigger %s failed: %s: %s", trigger_type, function_id, exc.code, exc.message
                )
                continue
            if (
                trigger_type == "stream:join"
                and isinstance(result, dict)
                and result.get("unauthorized") is True
            ):
                return True
        return False

    async def _read_sync(self, stream: str, group: str, item: str | None) -> Any:
        if item is not None:
            return await self._get(stream, group, item)
        return await self._list(stream, group)

    # -- overrides and adapter calls ----------------------------------------------------------

    def _override(self, op: str, stream: str) -> str | None:
        function_id = f"stream::{op}({stream})"
        return function_id if function_id in self.engine.registry.functions else None

    def _adapter(self) -> StreamAdapter:
        if self.adapter is None:
            raise IIIError("the stream adapter is not open", code="adapter_unavailable")
        return self.adapter

    async def _call(self, code: str, operation: Awaitable[Any]) -> Any:
        return await adapter_call(log, code, operation)

    def _limits(self, ctx: CallContext) -> WriteLimits:
        return WriteLimits.for_call(self.config.max_value_bytes, ctx)

    async def _get(
        self, stream: str, group: str, item: str, data: Any = None, grant: Grant | None = None
    ) -> Any:
        hook = self._override("get", stream)
        if hook is not None:
            return await self.engine.invoke(
                hook,
                data or {"stream_name": stream, "group_id": group, "item_id": item},
                grant=grant,
            )
        return await self._call("STREAM_GET_ERROR", self._adapter().get(stream, group, item))

    async def _list(
        self, stream: str, group: str, data: Any = None, grant: Grant | None = None
    ) -> Any:
        hook = self._override("list", stream)
        if hook is not None:
            return await self.engine.invoke(
                hook, data or {"stream_name": stream, "group_id": group}, grant=grant
            )
        return await self._call("STREAM_GET_GROUP_ERROR", self._adapter().list(stream, group))

    # -- functions --------------------------------------------------------------------------

    @staticmethod
    def _hook_result(result: Any, hook: str, keys: tuple[str, ...]) -> dict[str, Any]:
        if result is None and keys == ("old_value",):
            return {"old_value": None}
        if not isinstance(result, dict):
            raise IIIError(
                f"override {hook} returned {type(result).__name__}, expected an object with {', '.join(keys)}",
                code="JSON_ERROR",
            )
        return {key: result.get(key) for key in keys}

    def _emit_written(self, stream: str, group: str, item: str, body: dict[str, Any]) -> None:
        """The event of a set or update: ``create`` if there was no old value, else ``update``."""
        event_type = "create" if body["old_value"] is None else "update"
        event = {"type": event_type, "data": body["new_value"]}
        self._emit(stream_message(stream, group, item, event))

    async def set(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, SetInput, ctx.function_id)
        hook = self._override("set", args.stream_name)
        if hook is not None:
            answer = await self.engine.invoke(hook, data, grant=ctx.grant)
            body = self._hook_result(answer, hook, ("old_value", "new_value"))
        else:
            old = await self._call(
                "STREAM_SET_ERROR",
                self._adapter().set(
                    args.stream_name, args.group_id, args.item_id, args.data, self._limits(ctx)
                ),
            )
            body = {"old_value": old, "new_value": args.data}
        self._emit_written(args.stream_name, args.group_id, args.item_id, body)
        return body

    async def update(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, UpdateInput, ctx.function_id)
        ops = parse_ops(args.ops, ctx.function_id)
        hook = self._override("update", args.stream_name)
        if hook is not None:
            answer = await self.engine.invoke(hook, data, grant=ctx.grant)
            body = self._hook_result(answer, hook, ("old_value", "new_value"))
        else:
            result: UpdateResult = await self._call(
                "STREAM_SET_ERROR",
                self._adapter().update(
                    args.stream_name, args.group_id, args.item_id, ops, self._limits(ctx)
                ),
            )
            body = result.to_json()
        self._emit_written(args.stream_name, args.group_id, args.item_id, body)
        return body

    async def delete(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, ItemInput, ctx.function_id)
        hook = self._override("delete", args.stream_name)
        if hook is not None:
            answer = await self.engine.invoke(hook, data, grant=ctx.grant)
            old = self._hook_result(answer, hook, ("old_value",))["old_value"]
        else:
            old = await self._call(
                "STREAM_DELETE_ERROR",
                self._adapter().delete(
                    args.stream_name, args.group_id, args.item_id, self._limits(ctx)
                ),
            )
        if old is not None:
            self._emit(
                stream_message(
                    args.stream_name, args.group_id, args.item_id, {"type": "delete", "data": old}
                )
            )
        return {"old_value": old}

    async def get(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, ItemInput, ctx.function_id)
        return await self._get(args.stream_name, args.group_id, args.item_id, data, ctx.grant)

    async def list(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, GroupInput, ctx.function_id)
        return await self._list(args.stream_name, args.group_id, data, ctx.grant)

    async def list_groups(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, StreamInput, ctx.function_id)
        hook = self._override("list_groups", args.stream_name)
        if hook is not None:
            return await self.engine.invoke(hook, data, grant=ctx.grant)
        return await self._call(
            "STREAM_LIST_GROUPS_ERROR", self._adapter().list_groups(args.stream_name)
        )

    async def list_all(self, data: Any, ctx: CallContext) -> Any:
        parse_input(data, Empty, ctx.function_id)
        streams = await self._call("STREAM_LIST_ALL_ERROR", self._adapter().list_all())
        return {
            "stream": [{"id": name, "groups": groups} for name, groups in streams],
            "count": len(streams),
        }

    async def send(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, SendInput, ctx.function_id)
        self._emit(
            stream_message(
                args.stream_name,
                args.group_id,
                args.id,
                {"type": "event", "event": {"type": args.type, "data": args.data}},
            )
        )
        return None

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
