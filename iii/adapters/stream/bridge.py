"""Streams kept in another engine (``modules::stream::adapters::Bridge``).

Each operation is one call to the remote engine over the adapter's link
(:mod:`iii.adapters.bridge_link`, config ``bridge_url`` …), shown on the
remote as the worker ``iii-stream-bridge``.  With ``remote: state`` (the
default, upstream HEAD) the remote's stream module answers:

=============== ================================================================
get             ``stream::get {stream_name, group_id, item_id}``
set             ``stream::set {stream_name, group_id, item_id, data}``
delete          ``stream::delete {stream_name, group_id, item_id}`` → ``{old_value}``
update          ``stream::update {stream_name, group_id, item_id, ops}``
list            ``stream::list {stream_name, group_id}``
list_groups     ``stream::list_groups {stream_name}``
list_all        ``stream::list_all {}`` (upstream's Bridge answers an empty list)
=============== ================================================================

With ``remote: kv_server`` (the seed-era engine's Bridge) a group is the
``kv_server`` index ``<stream_name>::<group_id>`` and the item id its key:
``kv_server::get/set/delete/update/list``.  ``list_groups`` and ``list_all``
answer ``not_supported`` there (the seed engine read the groups from
``kv_server::list_keys_with_prefix``, which returns keys, not indexes).

Events, as upstream's Bridge (``stream.events``): every message this
engine's stream module makes (create, update, delete, custom event) is
published on the remote's PubSub topic ``stream.events`` (``publish``, fire
and forget), and the adapter subscribes to that topic on the remote (function
``stream::bridge::on_pub::<uuid>``, trigger type ``subscribe``).  The
messages other engines publish there reach this engine's stream clients and
fire its ``stream`` triggers (``on_peer_event``), as with a shared Redis
(upstream's Bridge hands them to its clients only).
Ours: each message published carries ``__iii_origin`` (the adapter's random
id), so the adapter drops its own messages when they come back, and removes
the key from the others; an upstream engine on the same remote ignores the
extra key.  Messages from the remote are checked by the stream module
(``_peer_message``) and are never trusted for more than delivery.

Limits (a read of the old value first for callers with small frames) and a
link drop: as :mod:`iii.adapters.state.bridge`.

Lifetime: :func:`open_adapter` owns the link (its task runs in the adapter's
nursery) until the module leaves its block.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs

from iii.adapters.bridge_link import BridgeLink, open_bridge_link
from iii.adapters.limits import NO_LIMITS, WriteLimits
from iii.adapters.state.bridge import (
    as_list,
    bad_answer,
    might_not_fit,
    op_to_json,
    update_result,
    value_size,
)
from iii.errors import IIIError
from iii.link import TraceContext
from iii.update_ops import UpdateOp, UpdateResult

__all__ = ["BridgeStreamAdapter", "open_adapter", "STREAM_EVENTS_TOPIC", "ORIGIN_KEY"]

log = logging.getLogger(__name__)

WORKER_NAME: Final = "iii-stream-bridge"
STREAM_EVENTS_TOPIC: Final = "stream.events"
ORIGIN_KEY: Final = "__iii_origin"


def _not_supported(what: str) -> IIIError:
    return IIIError(f"{what} is not available on a kv_server bridge", code="not_supported")


@attrs.define(eq=False)
class BridgeStreamAdapter:
    bridge: BridgeLink
    on_peer_event: Callable[[dict[str, Any]], None]
    origin: str = attrs.field(factory=lambda: uuid.uuid4().hex)

    @property
    def link(self) -> Any:
        return self.bridge.link

    @property
    def _kv(self) -> bool:
        return self.bridge.settings.remote == "kv_server"

    def _item(self, stream: str, group: str, item: str, **rest: Any) -> dict[str, Any]:
        if self._kv:
            return {"index": f"{stream}::{group}", "key": item, **rest}
        return {"stream_name": stream, "group_id": group, "item_id": item, **rest}

    def _fn(self, op: str) -> str:
        return f"kv_server::{op}" if self._kv else f"stream::{op}"

    async def _old_size(
        self, limits: WriteLimits, stream: str, group: str, item: str, new_bytes: int = 0
    ) -> int:
        """The old value's size if the answer might not fit the caller's frames, else 0.

        The old value is read only when it matters: when an old value as large
        as ``max_value_bytes`` beside the new one would not fit the caller.
        """
        if not might_not_fit(limits, new_bytes):
            return 0
        old = await self.get(stream, group, item)
        return 0 if old is None else value_size(old)

    async def get(self, stream: str, group: str, item: str) -> Any:
        return await self.bridge.call(self._fn("get"), self._item(stream, group, item))

    async def set(
        self, stream: str, group: str, item: str, value: Any, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        size = value_size(value)
        limits.check_write(
            old_bytes=await self._old_size(limits, stream, group, item, size), new_bytes=size
        )
        function_id = self._fn("set")
        key = "value" if self._kv else "data"
        answer = await self.bridge.call(
            function_id, self._item(stream, group, item, **{key: value})
        )
        if not isinstance(answer, dict) or "old_value" not in answer:
            raise bad_answer(function_id, "something other than {old_value, new_value}")
        return answer["old_value"]

    async def delete(
        self, stream: str, group: str, item: str, limits: WriteLimits = NO_LIMITS
    ) -> Any:
        limits.check_delete(old_bytes=await self._old_size(limits, stream, group, item))
        function_id = self._fn("delete")
        answer = await self.bridge.call(function_id, self._item(stream, group, item))
        if not isinstance(answer, dict) or "old_value" not in answer:
            raise bad_answer(function_id, "something other than {old_value}")
        return answer["old_value"]

    async def update(
        self,
        stream: str,
        group: str,
        item: str,
        ops: builtins.list[UpdateOp],
        limits: WriteLimits = NO_LIMITS,
    ) -> UpdateResult:
        function_id = self._fn("update")
        answer = await self.bridge.call(
            function_id, self._item(stream, group, item, ops=[op_to_json(op) for op in ops])
        )
        return update_result(answer, function_id)

    async def list(self, stream: str, group: str) -> builtins.list[Any]:
        function_id = self._fn("list")
        data = (
            {"index": f"{stream}::{group}"}
            if self._kv
            else {"stream_name": stream, "group_id": group}
        )
        return as_list(await self.bridge.call(function_id, data), function_id)

    async def list_groups(self, stream: str) -> builtins.list[str]:
        if self._kv:
            raise _not_supported("stream::list_groups")
        answer = as_list(
            await self.bridge.call("stream::list_groups", {"stream_name": stream}),
            "stream::list_groups",
        )
        if not all(isinstance(group, str) for group in answer):
            raise bad_answer("stream::list_groups", "group ids that are not strings")
        return sorted(answer)

    async def list_all(self) -> builtins.list[tuple[str, builtins.list[str]]]:
        if self._kv:
            raise _not_supported("stream::list_all")
        answer = await self.bridge.call("stream::list_all", {})
        entries = answer.get("stream") if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise bad_answer("stream::list_all", "no stream list")
        streams: builtins.list[tuple[str, builtins.list[str]]] = []
        for entry in entries:
            name = entry.get("id") if isinstance(entry, dict) else None
            groups = entry.get("groups") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not isinstance(groups, list):
                raise bad_answer("stream::list_all", "a malformed stream entry")
            streams.append((name, sorted(g for g in groups if isinstance(g, str))))
        return sorted(streams)

    async def publish_event(self, message: dict[str, Any]) -> None:
        await self.bridge.call_void(
            "publish", {"topic": STREAM_EVENTS_TOPIC, "data": {**message, ORIGIN_KEY: self.origin}}
        )

    async def on_remote_message(self, data: Any, trace: TraceContext) -> None:
        """A message on the remote's ``stream.events``: ours is dropped, others go to the module.

        The module checks the message's shape (a malformed one is logged and dropped).
        """
        if isinstance(data, dict) and ORIGIN_KEY in data:
            if data[ORIGIN_KEY] == self.origin:
                return None
            data = {key: value for key, value in data.items() if key != ORIGIN_KEY}
        self.on_peer_event(data)
        return None

    def watch_events(self) -> None:
        """Subscribe to the remote's ``stream.events`` (re-sent by the link after a reconnect)."""
        handler_id = f"stream::bridge::on_pub::{self.origin}"
        self.bridge.link.expose(
            handler_id, self.on_remote_message, description="Stream events from other engines"
        )
        self.bridge.link.register_trigger(
            f"stream-bridge-{self.origin}", "subscribe", handler_id, {"topic": STREAM_EVENTS_TOPIC}
        )


@asynccontextmanager
async def open_adapter(
    raw: Any, *, on_peer_event: Callable[[dict[str, Any]], None], where: str
) -> AsyncIterator[BridgeStreamAdapter]:
    adapters: builtins.list[BridgeStreamAdapter] = []

    def prepare(bridge: BridgeLink) -> None:
        adapters.append(BridgeStreamAdapter(bridge, on_peer_event))
        adapters[0].watch_events()

    async with open_bridge_link(raw, where=f"{where}.config", name=WORKER_NAME, prepare=prepare):
        yield adapters[0]
