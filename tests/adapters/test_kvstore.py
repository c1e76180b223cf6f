"""The embedded key-value store: memory and file modes, durability, locking."""

from __future__ import annotations

import pytest
import trio

from iii.adapters.filelog import HEADER
from iii.adapters.kvstore import KvStoreConfig, KvStoreLockedError, open_kv_store
from iii.config_schema import CONFIG_CONVERTER, structure_config
from iii.errors import ConfigError
from iii.update_ops import parse_ops


def file_config(path, **extra):
    return CONFIG_CONVERTER.structure(
        {"store_method": "file_based", "file_path": str(path), **extra}, KvStoreConfig
    )


@pytest.fixture(params=["memory", "file"])
def config(request, tmp_path):
    if request.param == "memory":
        return KvStoreConfig()
    return file_config(tmp_path / "kv")


async def test_basic_operations(config):
    async with open_kv_store(config) as store:
        assert await store.set("i", "a", {"x": 1}) is None
        assert await store.set("i", "b", 2) is None
        assert await store.set("i", "a", {"x": 3}) == {"x": 1}
        assert await store.list("i") == [{"x": 3}, 2]  # re-set keeps insertion order
        assert await store.keys("i") == ["a", "b"]
        got = await store.get("i", "a")
        got["x"] = 99  # values handed out are copies
        assert await store.get("i", "a") == {"x": 3}
        assert await store.delete("i", "a") == {"x": 3}
        assert await store.delete("i", "a") is None
        assert await store.list_indexes() == ["i"]
        await store.delete("i", "b")
        assert await store.list_indexes() == []
        result = await store.update(
            "j", "k", parse_ops([{"type": "increment", "path": "n", "by": 2}])
        )
        assert (result.old_value, result.new_value) == (None, {"n": 2})
        await store.write_batch(
            [("set", "j", "x", 1), ("delete", "j", "k"), ("set", "m", "y", [1])]
        )
        assert await store.items("j") == [("x", 1)]
        assert await store.get("m", "y") == [1]


async def test_file_store_survives_reopen_and_compaction(tmp_path):
    config = file_config(tmp_path / "kv")
    async with open_kv_store(config) as store:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(store.set, f"idx{i % 3}", f"k{i}", {"i": i})
        for i in range(0, 200, 2):
            await store.delete(f"idx{i % 3}", f"k{i}")
        await store.update(
            "idx0", "k3", parse_ops([{"type": "set", "path": "extra", "value": True}])
        )
        before = {i: await store.items(i) for i in await store.list_indexes()}
        await store.compact()
        assert store.statistics().log_records == 0
        await store.set("after", "compaction", 1)
    async with open_kv_store(config) as store:
        after = {i: await store.items(i) for i in await store.list_indexes() if i != "after"}
        assert after == before
        assert await store.get("after", "compaction") == 1
        assert store.recovery is not None and not store.recovery.damaged


async def test_damaged_tail_is_reported(tmp_path):
    config = file_config(tmp_path / "kv")
    async with open_kv_store(config) as store:
        await store.set("i", "kept", 1)
    with open(tmp_path / "kv" / "store.log", "ab") as file:
        file.write(HEADER.pack(50, 1) + b"garbage")
    async with open_kv_store(config) as store:
        assert await store.get("i", "kept") == 1
        assert store.recovery.damaged and store.recovery.saved_copy


async def test_two_stores_cannot_share_a_directory(tmp_path):
    config = file_config(tmp_path / "kv")
    async with open_kv_store(config):
        with pytest.raises(KvStoreLockedError):
            async with open_kv_store(config):
                pass


def test_config_reading():
    def read(raw):
        return structure_config(raw, KvStoreConfig, file="f.yaml", path="store")

    assert read({}) == KvStoreConfig()
    with pytest.raises(ConfigError) as info:
        read({"save_interval_ms": "soon"})
    assert info.value.key == "store.save_interval_ms"
    with pytest.raises(ConfigError) as info:
        read({"save_interval_ms": True})  # a boolean is not a number of ms
    assert info.value.key == "store.save_interval_ms"
    with pytest.raises(ConfigError) as info:
        read({"store_method": "file_based", "other": 1})
    assert info.value.key == "store" and "other" in info.value.reason


async def test_an_unknown_store_method_keeps_the_store_in_memory(tmp_path, caplog):
    config = KvStoreConfig(store_method="weird", file_path=str(tmp_path / "never"))
    async with open_kv_store(config) as store:
        await store.set("i", "k", 1)
        assert await store.get("i", "k") == 1
    assert not (tmp_path / "never").exists()
    assert "unknown store_method 'weird'" in caplog.text


async def test_a_disk_error_makes_the_store_refuse_further_use(tmp_path):
    import os

    from iii.errors import AdapterUnavailableError

    async with open_kv_store(file_config(tmp_path / "kv")) as store:
        await store.set("i", "k", 1)
        os.close(store._log._fd)  # the next write fails with EBADF, a real OS error
        with pytest.raises(AdapterUnavailableError):
            await store.set("i", "k", 2)
        with pytest.raises(AdapterUnavailableError):
            await store.get("i", "k")
        store._log._fd = os.open(os.devnull, os.O_WRONLY)  # let the close on exit succeed
    async with open_kv_store(file_config(tmp_path / "kv")) as store:
        assert await store.get("i", "k") == 1  # the refused write is not there
