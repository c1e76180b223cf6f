"""Store writes that answer an error change nothing (issue 10 row 4).

state, stream and kv_server, on every backend they have (memory, file,
Redis): a value over ``max_value_bytes`` is refused with ``VALUE_TOO_LARGE``,
and a write whose answer would not fit the caller's frames (a raw worker is
taken for a 0.4.1 SDK: 1 MiB) with ``payload_too_large``; either way the
stored value is what it was, and no event fires.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from iii.config import parse_config
from iii.errors import ConfigError
from iii.json_limits import MAX_VALUE_DEPTH
from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.backends import KIND_PARAMS, KINDS, adapter_block, delete_prefix
from tests.support import SERVICE_KINDS

KiB = 1024
# module -> (function prefix, key fields of an item, name of the value field)
STORES = {
    "state": ("state::", {"scope": "s", "key": "k"}, "value"),
    "stream": ("stream::", {"stream_name": "s", "group_id": "g", "item_id": "i"}, "data"),
    "kv_server": ("kv_server::", {"index": "s", "key": "k"}, "value"),
}
# (the KV server has no Redis backend)
CASES = [
    pytest.param(
        m, kind, marks=[pytest.mark.services] if kind in SERVICE_KINDS else [], id=f"{m}-{kind}"
    )
    for m in STORES
    for kind in KINDS
    if not (m == "kv_server" and kind == "redis")
]


def module_entry(module: str, kind: str, tmp_path: Path, max_value_bytes: int) -> dict[str, Any]:
    if module == "kv_server":
        store = {"store_method": "file_based", "file_path": str(tmp_path / "kv")}
        config = {**(store if kind == "file" else {}), "max_value_bytes": max_value_bytes}
        return {"class": "modules::kv_server::KvServer", "config": config}
    block = adapter_block(module, kind, tmp_path)
    config: dict[str, Any] = {"adapter": block, "max_value_bytes": max_value_bytes}
    if module == "stream":
        config.update(port=0, host="127.0.0.1")
    cls = "modules::state::StateModule" if module == "state" else "modules::stream::StreamModule"
    return {"class": cls, "config": config}


@asynccontextmanager
async def store_engine(
    module: str, kind: str, tmp_path: Path, max_value_bytes: int
) -> AsyncIterator[Any]:
    entry = module_entry(module, kind, tmp_path, max_value_bytes)
    try:
        async with open_test_engine(make_config([entry])) as engine:
            yield engine
    finally:
        if kind == "redis":
            await delete_prefix(entry["config"]["adapter"]["config"]["key_prefix"])


def code_of(reply: dict[str, Any]) -> str | None:
    error = reply.get("error")
    return error["code"] if error else None


@pytest.mark.parametrize(("module", "kind"), CASES)
async def test_a_value_over_max_value_bytes_is_refused_and_changes_nothing(module, kind, tmp_path):
    prefix, item, field = STORES[module]
    async with store_engine(module, kind, tmp_path, 10 * KiB) as engine:
        async with connect_test_worker(engine) as w:
            assert code_of(await w.call(f"{prefix}set", {**item, field: "a" * (8 * KiB)})) is None
            reply = await w.call(f"{prefix}set", {**item, field: "b" * (11 * KiB)})
            assert code_of(reply) == "VALUE_TOO_LARGE", reply
            append = {"type": "append", "value": "c" * (3 * KiB)}
            reply = await w.call(f"{prefix}update", {**item, "ops": [append]})
            assert code_of(reply) == "VALUE_TOO_LARGE", reply
            assert (await w.call(f"{prefix}get", item))["result"] == "a" * (8 * KiB)


@pytest.mark.parametrize(("module", "kind"), CASES)
async def test_a_write_whose_answer_would_not_fit_the_caller_is_refused(module, kind, tmp_path):
    prefix, item, field = STORES[module]
    async with store_engine(module, kind, tmp_path, 4096 * KiB) as engine:
        async with connect_test_worker(engine) as w:  # 1 MiB frames, as a 0.4.1 SDK
            value = "a" * (600 * KiB)
            assert code_of(await w.call(f"{prefix}set", {**item, field: value})) is None
            # {old_value, new_value}: 600 KiB + 600 KiB does not fit in 1 MiB.
            reply = await w.call(f"{prefix}set", {**item, field: "b" * (600 * KiB)})
            assert code_of(reply) == "payload_too_large", reply
            assert "nothing was changed" in reply["error"]["message"]
            append = {"type": "append", "value": "c" * (300 * KiB)}
            reply = await w.call(f"{prefix}update", {**item, "ops": [append]})
            assert code_of(reply) == "payload_too_large", reply
            assert (await w.call(f"{prefix}get", item))["result"] == value
            # A smaller write still goes through, and so does the delete.
            reply = await w.call(f"{prefix}set", {**item, field: "d" * (300 * KiB)})
            assert code_of(reply) is None
            assert code_of(await w.call(f"{prefix}delete", item)) is None
            assert (await w.call(f"{prefix}get", item)).get("result") is None


@pytest.mark.parametrize("kind", KIND_PARAMS)
async def test_a_delete_whose_answer_would_not_fit_is_refused(kind, tmp_path):
    async with store_engine("state", kind, tmp_path, 4096 * KiB) as engine:
        async with connect_test_worker(engine) as w:
            ops = [{"type": "append", "value": "a" * (500 * KiB)}]
            for _ in range(3):  # grown by a worker whose answers fit, to 1.5 MiB
                await engine.invoke("state::update", {"scope": "s", "key": "k", "ops": ops})
            reply = await w.call("state::delete", {"scope": "s", "key": "k"})
            assert code_of(reply) == "payload_too_large", reply
            value = await engine.invoke("state::get", {"scope": "s", "key": "k"})
            assert len(value) == 1500 * KiB  # still there


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (0, "must be"),
        (True, "expected an integer, got a boolean"),
        ("1", "expected an integer, got a string"),
    ],
)
@pytest.mark.parametrize(
    "cls",
    [
        "modules::state::StateModule",
        "modules::stream::StreamModule",
        "modules::kv_server::KvServer",
    ],
)
def test_max_value_bytes_must_be_a_positive_integer(cls, raw, reason):
    with pytest.raises(ConfigError) as caught:
        modules = [{"class": cls, "config": {"max_value_bytes": raw}}]
        parse_config({"modules": modules}, file="c.yaml")
    assert str(caught.value).startswith("c.yaml: modules[0].config.max_value_bytes: ")
    assert reason in str(caught.value)


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("kind", KIND_PARAMS)
async def test_the_deepest_value_update_ops_build_can_be_read_and_set_again(kind, tmp_path):
    # issue 10 row 2: a value the engine built must go out, and come back, as well.
    async with store_engine("state", kind, tmp_path, 4096 * KiB) as engine:
        async with connect_test_worker(engine) as w:
            item = {"scope": "s", "key": "k"}
            # An op's value sits 4 levels down its frame (data, ops, op): 124 at most.
            part = nested(MAX_VALUE_DEPTH - 2)
            deepest = {"type": "set", "path": ["a", "b"], "value": part}
            reply = await w.call("state::update", {**item, "ops": [deepest]})
            assert "errors" not in reply["result"], reply
            too_deep = {"type": "set", "path": ["x", "y", "z"], "value": part}
            reply = await w.call("state::update", {**item, "ops": [too_deep]})
            assert [e["code"] for e in reply["result"]["errors"]] == ["set.too_deep"]
            value = (await w.call("state::get", item))["result"]
            assert value == {"a": {"b": part}}
            assert "error" not in await w.call("state::set", {**item, "value": value})
