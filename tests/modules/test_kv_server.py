"""The KV server module through a raw worker (memory and file-based)."""

from __future__ import annotations

import pytest

from iii.config import parse_config
from iii.errors import ConfigError
from iii.testing import connect_test_worker, make_config, open_test_engine


def ok(reply):
    assert "error" not in reply, reply
    return reply.get("result")


def kv_config(tmp_path=None):
    config = {"store_method": "file_based", "file_path": str(tmp_path / "kv")} if tmp_path else {}
    return make_config([{"class": "modules::kv_server::KvServer", "config": config}])


def test_an_unknown_key_is_a_config_error_like_in_every_module():
    # Was ignored (the module's config was read leniently, as upstream).
    entry = {"class": "modules::kv_server::KvServer", "config": {"unknown_key": "x"}}
    with pytest.raises(ConfigError) as info:
        parse_config({"modules": [entry]}, file="f.yaml")
    assert info.value.key == "modules[0].config" and "unknown_key" in info.value.reason
    entry["config"] = {"max_value_bytes": True}
    with pytest.raises(ConfigError) as info:
        parse_config({"modules": [entry]}, file="f.yaml")
    assert info.value.key == "modules[0].config.max_value_bytes"


async def test_functions_and_prefix_listing_returns_keys():
    async with open_test_engine(kv_config()) as engine, connect_test_worker(engine) as w:
        assert ok(
            await w.call(
                "kv_server::set", {"index": "default", "key": "user:1", "value": {"name": "Alice"}}
            )
        ) == {
            "old_value": None,
            "new_value": {"name": "Alice"},
        }
        ok(
            await w.call(
                "kv_server::set", {"index": "default", "key": "user:2", "value": {"name": "Bob"}}
            )
        )
        ok(
            await w.call(
                "kv_server::set",
                {"index": "default", "key": "product:1", "value": {"name": "Widget"}},
            )
        )
        ok(await w.call("kv_server::set", {"index": "other", "key": "user:3", "value": 3}))
        assert ok(await w.call("kv_server::list_keys_with_prefix", {"prefix": "user:"})) == [
            "user:1",
            "user:2",
            "user:3",
        ]
        assert ok(
            await w.call(
                "kv_server::list_keys_with_prefix", {"prefix": "user:", "index": "default"}
            )
        ) == ["user:1", "user:2"]
        assert ok(await w.call("kv_server::get", {"index": "default", "key": "user:1"})) == {
            "name": "Alice"
        }
        assert ok(await w.call("kv_server::list", {"index": "default"})) == [
            {"name": "Alice"},
            {"name": "Bob"},
            {"name": "Widget"},
        ]
        reply = ok(
            await w.call(
                "kv_server::update",
                {"index": "c", "key": "n", "ops": [{"type": "increment", "path": "hits", "by": 1}]},
            )
        )
        assert reply == {"old_value": None, "new_value": {"hits": 1}}
        assert ok(await w.call("kv_server::delete", {"index": "default", "key": "user:2"})) == {
            "old_value": {"name": "Bob"}
        }
        assert ok(await w.call("kv_server::delete", {"index": "default", "key": "user:2"})) == {
            "old_value": None
        }
        reply = await w.call("kv_server::get", {"index": "default"})
        assert reply["error"]["code"] == "deserialization_error"


async def test_file_based_store_survives_restart(tmp_path):
    async with open_test_engine(kv_config(tmp_path)) as engine, connect_test_worker(engine) as w:
        for i in range(20):
            ok(await w.call("kv_server::set", {"index": "i", "key": f"k{i}", "value": i}))
        ok(await w.call("kv_server::delete", {"index": "i", "key": "k3"}))
    async with open_test_engine(kv_config(tmp_path)) as engine, connect_test_worker(engine) as w:
        values = ok(await w.call("kv_server::list", {"index": "i"}))
        assert values == [i for i in range(20) if i != 3]
