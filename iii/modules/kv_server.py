"""KV server: ``modules::kv_server::KvServer`` (on by default; spec modules.md §7).

A namespaced key-value store for workers, on the embedded store
(:mod:`iii.adapters.kvstore`).  ``index`` is the namespace.

================================== ======================== ====================================
``kv_server::get``                 ``{index, key}``          the value or null
``kv_server::set``                 ``{index, key, value}``   ``{old_value, new_value}``
``kv_server::delete``              ``{index, key}``          ``{old_value}``
``kv_server::update``              ``{index, key, ops}``     ``{old_value, new_value[, errors]}``
                                                             (a missing key starts as ``{}``)
``kv_server::list``                ``{index}``               the values, in insertion order
``kv_server::list_keys_with_prefix`` ``{prefix, index?}``    sorted keys starting with ``prefix``
================================== ======================== ====================================

``list_keys_with_prefix`` returns **keys**, as the docs promise (v0.4 returned
index names, a bug): the keys of ``index`` when it is given, else the keys of
every index (each once).  There are no trigger types.

Config (:class:`Config`; an unknown key is an error, as in every module): ``store_method``
(``in_memory`` | ``file_based``), ``file_path`` (a directory),
``save_interval_ms``.  File-based writes are durable before they are
acknowledged.  ``max_value_bytes`` (ours, default 16 MiB): a value that would
encode larger is refused with ``VALUE_TOO_LARGE``, and a write whose answer
would not fit the caller's frames with ``payload_too_large``, both before
anything changes (:mod:`iii.adapters.limits`).

Lifetime: :meth:`Module.run` opens the store and keeps it open until the
module is cancelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.adapters.kvstore import KvStore, KvStoreConfig, open_kv_store
from iii.adapters.limits import DEFAULT_MAX_VALUE_BYTES, WriteLimits
from iii.config_schema import Count
from iii.errors import IIIError
from iii.modules import ModuleStatistics
from iii.modules._functions import register_functions
from iii.native import CallContext, parse_input
from iii.update_ops import parse_ops

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module"]


@attrs.frozen(kw_only=True)
class Config(KvStoreConfig):
    """The embedded store's keys, and ``max_value_bytes`` (ours)."""

    max_value_bytes: Count = Count(DEFAULT_MAX_VALUE_BYTES)


@attrs.frozen(kw_only=True)
class IndexKey:
    index: str
    key: str


@attrs.frozen(kw_only=True)
class SetInput:
    index: str
    key: str
    value: Any = None


@attrs.frozen(kw_only=True)
class UpdateInput:
    index: str
    key: str
    ops: Any


@attrs.frozen(kw_only=True)
class IndexInput:
    index: str


@attrs.frozen(kw_only=True)
class PrefixInput:
    prefix: str
    index: str | None = None


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.store_config: KvStoreConfig = config
        self.max_value_bytes: int = config.max_value_bytes
        self.store: KvStore | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_kv_store(self.store_config) as store:
            self.store = store
            register_functions(
                self.engine,
                "kv_server::",
                [
                    ("get", self.get, "Get a value by key"),
                    ("set", self.set, "Set a value by key"),
                    ("delete", self.delete, "Delete a value by key"),
                    ("update", self.update, "Update a value with atomic operations"),
                    ("list", self.list, "List the values of an index"),
                    (
                        "list_keys_with_prefix",
                        self.list_keys_with_prefix,
                        "List keys starting with a prefix",
                    ),
                ],
            )
            task_status.started()
            await trio.sleep_forever()

    def _store(self) -> KvStore:
        if self.store is None:
            raise IIIError("the kv store is not open", code="adapter_unavailable")
        return self.store

    async def get(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, IndexKey, ctx.function_id)
        return await self._store().get(args.index, args.key)

    def _limits(self, ctx: CallContext) -> WriteLimits:
        return WriteLimits.for_call(self.max_value_bytes, ctx)

    async def set(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, SetInput, ctx.function_id)
        old = await self._store().set(args.index, args.key, args.value, self._limits(ctx))
        return {"old_value": old, "new_value": args.value}

    async def delete(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, IndexKey, ctx.function_id)
        return {"old_value": await self._store().delete(args.index, args.key, self._limits(ctx))}

    async def update(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, UpdateInput, ctx.function_id)
        ops = parse_ops(args.ops, ctx.function_id)
        result = await self._store().update(args.index, args.key, ops, self._limits(ctx))
        return result.to_json()

    async def list(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, IndexInput, ctx.function_id)
        return await self._store().list(args.index)

    async def list_keys_with_prefix(self, data: Any, ctx: CallContext) -> Any:
        args = parse_input(data, PrefixInput, ctx.function_id)
        store = self._store()
        indexes = [args.index] if args.index is not None else await store.list_indexes()
        keys: set[str] = set()
        for index in indexes:
            keys.update(k for k in await store.keys(index) if k.startswith(args.prefix))
        return sorted(keys)

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
