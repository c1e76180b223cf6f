"""State and KV server functions and the ``state`` trigger from official SDK workers."""

from __future__ import annotations

import pytest

from iii.testing import make_config, open_test_engine
from tests.sdk_workers import VERSIONS, SdkCallError, sdk_worker, wait_registered

pytestmark = pytest.mark.sdk


@pytest.mark.parametrize("version", VERSIONS)
async def test_state_and_kv_server_from_sdk(version, tmp_path):
    config = make_config(
        [
            {
                "class": "modules::state::StateModule",
                "config": {
                    "adapter": {
                        "class": "modules::state::adapters::KvStore",
                        "config": {
                            "store_method": "file_based",
                            "file_path": str(tmp_path / "state"),
                        },
                    }
                },
            },
            {"class": "modules::kv_server::KvServer", "config": {}},
        ]
    )
    async with open_test_engine(config) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with sdk_worker(
            version,
            url,
            handlers={"sdk::on_state": None, "sdk::only_orders": True},
            triggers=[
                [
                    "state",
                    "sdk::on_state",
                    {"scope": "orders", "condition_function_id": "sdk::only_orders"},
                ]
            ],
        ) as w:
            await wait_registered(engine, ["sdk::on_state", "sdk::only_orders"], triggers=1)
            assert await w.call(
                "state::set", {"scope": "orders", "key": "o1", "value": {"qty": 1}}
            ) == {"old_value": None, "new_value": {"qty": 1}}
            assert await w.call("state::get", {"scope": "orders", "key": "o1"}) == {"qty": 1}
            result = await w.call(
                "state::update",
                {
                    "scope": "orders",
                    "key": "o1",
                    "ops": [
                        {"type": "increment", "path": "qty", "by": 2},
                        {"type": "set", "path": ["meta", "by"], "value": version},
                    ],
                },
            )
            assert result == {
                "old_value": {"qty": 1},
                "new_value": {"qty": 3, "meta": {"by": version}},
            }
            assert await w.call("state::list", {"scope": "orders"}) == [
                {"qty": 3, "meta": {"by": version}}
            ]
            assert await w.call("state::list_groups", {}) == {"groups": ["orders"]}
            await w.call("state::set", {"scope": "elsewhere", "key": "x", "value": 1})
            assert await w.call("state::delete", {"scope": "orders", "key": "o1"}) == {
                "qty": 3,
                "meta": {"by": version},
            }
            events = await w.wait_events(3, "sdk::on_state")
            assert sorted(e["event_type"] for e in events) == [
                "state:created",
                "state:deleted",
                "state:updated",
            ]
            updated = next(e for e in events if e["event_type"] == "state:updated")
            assert updated["old_value"] == {"qty": 1} and updated["new_value"]["qty"] == 3
            assert all(e["scope"] == "orders" for e in events)  # the "elsewhere" write did not fire
            assert len(await w.wait_events(3, "sdk::only_orders")) == 3

            with pytest.raises(SdkCallError) as caught:
                await w.call("state::get", {"scope": "orders"})
            assert caught.value.code == "deserialization_error", caught.value.message

            assert await w.call(
                "kv_server::set", {"index": "default", "key": "user:1", "value": {"n": 1}}
            ) == {"old_value": None, "new_value": {"n": 1}}
            assert await w.call("kv_server::get", {"index": "default", "key": "user:1"}) == {"n": 1}
            assert await w.call(
                "kv_server::update",
                {
                    "index": "default",
                    "key": "user:1",
                    "ops": [{"type": "merge", "value": {"m": 2}}],
                },
            ) == {"old_value": {"n": 1}, "new_value": {"n": 1, "m": 2}}
            assert await w.call("kv_server::list", {"index": "default"}) == [{"n": 1, "m": 2}]
            assert await w.call("kv_server::list_keys_with_prefix", {"prefix": "user:"}) == [
                "user:1"
            ]
            assert await w.call("kv_server::delete", {"index": "default", "key": "user:1"}) == {
                "old_value": {"n": 1, "m": 2}
            }
