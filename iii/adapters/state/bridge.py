"""State kept in another engine (``modules::state::adapters::Bridge``).

Each operation is one call to the remote engine over the adapter's link
(:mod:`iii.adapters.bridge_link`, config ``bridge_url`` …), shown on the
remote as the worker ``iii-state-bridge``.  With ``remote: state`` (the
default, upstream HEAD) the remote's own state module answers:

=============== =========================================
get             ``state::get {scope, key}``
set             ``state::set {scope, key, value}``
delete          ``state::delete {scope, key}``
update          ``state::update {scope, key, ops}``
list            ``state::list {scope}``
list_groups     ``state::list_groups {}`` → ``{groups}``
=============== =========================================

With ``remote: kv_server`` (the seed-era engine's Bridge) the scope is the
``kv_server`` index: ``kv_server::get/set/delete/update/list {index: scope,
…}``.  ``state::list_groups`` has no kv_server counterpart there (the seed
engine called a ``kv_server::list_groups`` that no engine registers) and
answers ``not_supported``; ``kv_server::update`` starts a missing key as
``{}``, as the kv server does.

The state module fires this engine's state triggers for the writes made
through it; the remote fires its own.  There are no events between engines
(``publish_event`` does nothing): a second engine bridged to the same remote
does not see this one's state events, as upstream.

Limits: the value of a ``set`` is checked against ``max_value_bytes`` here
before it is sent; the remote checks its own limits.  For a caller whose
frames are small (a 0.4.1 worker, 1 MiB: an old value up to
``max_value_bytes`` beside the new one might not fit) the adapter first reads the old
value and refuses a set or delete whose answer would not fit, before
anything is sent (``payload_too_large``); the check is not atomic across
the two engines, so a concurrent change between that read and the write can
still give such a caller an answer too large for it after the write, and an
update's answer is only known after it.  A call cut off by a link drop answers
``invocation_stopped`` (it may or may not have been applied).

Lifetime: :func:`open_adapter` owns the link (its task runs in the adapter's
nursery) until the module leaves its block.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson

from iii.adapters.bridge_link import BridgeLink, open_bridge_link
from iii.adapters.limits import NO_LIMITS, WriteLimits
from iii.errors import IIIError
from iii.update_ops import OpError, UpdateOp, UpdateResult

__all__ = [
    "BridgeStateAdapter",
    "open_adapter",
    "value_size",
    "op_to_json",
    "update_result",
    "as_list",
    "bad_answer",
    "might_not_fit",
]

WORKER_NAME = "iii-state-bridge"


def value_size(value: Any) -> int:
    """The encoded size of a value (what the stores count)."""
    try:
        return len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise IIIError(
            f"the value cannot be stored as JSON: {exc}", code="serialization_error"
        ) from None


def might_not_fit(limits: WriteLimits, new_bytes: int) -> bool:
    """Whether a write's answer (old value + ``new_bytes``) could be too large for the caller."""
    if limits.max_answer_bytes is None:
        return False
    if limits.max_value_bytes is None:
        return True
    return new_bytes + limits.max_value_bytes > limits.max_answer_bytes


def bad_answer(function_id: str, what: str) -> IIIError:
    return IIIError(
        f"the remote engine answered {function_id} with {what}", code="bad_remote_answer"
    )


def op_to_json(op: UpdateOp) -> dict[str, Any]:
    """An op in its wire form again (the path as the SDKs send it)."""
    path: Any = "" if not op.path else op.path[0] if len(op.path) == 1 else list(op.path)
    out: dict[str, Any] = {"type": op.type, "path": path}
    if op.type in ("increment", "decrement"):
        out["by"] = op.by
    elif op.type != "remove":
        out["value"] = op.value
    return out


def _op_error(raw: Any, function_id: str) -> OpError:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("op_index"), int)
        or not isinstance(raw.get("code"), str)
        or not isinstance(raw.get("message"), str)
    ):
        raise bad_answer(function_id, "a malformed op error")
    return OpError(raw["op_index"], raw["code"], raw["message"])


def update_result(answer: Any, function_id: str) -> UpdateResult:
    """``{old_value, new_value[, errors]}`` from the remote, checked."""
    if not isinstance(answer, dict) or not {"old_value", "new_value"} <= answer.keys():
        raise bad_answer(function_id, "something other than {old_value, new_value}")
    errors = answer.get("errors") or []
    if not isinstance(errors, list):
        raise bad_answer(function_id, "errors that are not a list")
    return UpdateResult(
        answer["old_value"], answer["new_value"], tuple(_op_error(e, function_id) for e in errors)
    )


def as_list(answer: Any, function_id: str) -> builtins.list[Any]:
    if not isinstance(answer, list):
        raise bad_answer(function_id, "something other than a list")
    return answer


def old_value_of_set(answer: Any, function_id: str) -> Any:
    if not isinstance(answer, dict) or "old_value" not in answer:
        raise bad_answer(function_id, "something other than {old_value, new_value}")
    return answer["old_value"]


@attrs.define(eq=False)
class BridgeStateAdapter:
    bridge: BridgeLink

    @property
    def link(self) -> Any:
        return self.bridge.link

    @property
    def _kv(self) -> bool:
        return self.bridge.settings.remote == "kv_server"

    def _args(self, scope: str, **rest: Any) -> dict[str, Any]:
        return {"index" if self._kv else "scope": scope, **rest}

    def _fn(self, op: str) -> str:
        return f"kv_server::{op}" if self._kv else f"state::{op}"

    async def get(self, scope: str, key: str) -> Any:
        return await self.bridge.call(self._fn("get"), self._args(scope, key=key))

    async def _old_size(self, limits: WriteLimits, scope: str, key: str, new_bytes: int = 0) -> int:
        """The old value's size if the answer might not fit the caller's frames, else 0.

        The old value is read only when it matters: when an old value as large
        as ``max_value_bytes`` beside the new one would not fit the caller.
        """
        if not might_not_fit(limits, new_bytes):
            return 0
        old = await self.get(scope, key)
        return 0 if old is None else value_size(old)

    async def set(self, scope: str, key: str, value: Any, limits: WriteLimits = NO_LIMITS) -> Any:
        size = value_size(value)
        limits.check_value(size)
        limits.check_write(old_bytes=await self._old_size(limits, scope, key, size), new_bytes=size)
        function_id = self._fn("set")
        answer = await self.bridge.call(function_id, self._args(scope, key=key, value=value))
        return old_value_of_set(answer, function_id)

    async def delete(self, scope: str, key: str, limits: WriteLimits = NO_LIMITS) -> Any:
        limits.check_delete(old_bytes=await self._old_size(limits, scope, key))
        answer = await self.bridge.call(self._fn("delete"), self._args(scope, key=key))
        if self._kv:  # kv_server::delete answers {old_value}
            return answer.get("old_value") if isinstance(answer, dict) else None
        return answer

    async def update(
        self, scope: str, key: str, ops: builtins.list[UpdateOp], limits: WriteLimits = NO_LIMITS
    ) -> UpdateResult:
        function_id = self._fn("update")
        answer = await self.bridge.call(
            function_id, self._args(scope, key=key, ops=[op_to_json(op) for op in ops])
        )
        return update_result(answer, function_id)

    async def list(self, scope: str) -> builtins.list[Any]:
        function_id = self._fn("list")
        return as_list(await self.bridge.call(function_id, self._args(scope)), function_id)

    async def list_groups(self) -> builtins.list[str]:
        if self._kv:
            raise IIIError(
                "state::list_groups is not available on a kv_server bridge", code="not_supported"
            )
        answer = await self.bridge.call("state::list_groups", {})
        groups = answer.get("groups") if isinstance(answer, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise bad_answer("state::list_groups", "no list of groups")
        return sorted(groups)

    async def publish_event(self, event: dict[str, Any]) -> None:
        return None


@asynccontextmanager
async def open_adapter(
    raw: Any, *, on_peer_event: Any, where: str
) -> AsyncIterator[BridgeStateAdapter]:
    async with open_bridge_link(raw, where=f"{where}.config", name=WORKER_NAME) as bridge:
        yield BridgeStateAdapter(bridge)
