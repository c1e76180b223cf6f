"""Stream functions, triggers and per-stream overrides from official SDK workers,
with a raw WebSocket client watching."""

from __future__ import annotations

import pytest

from iii.testing import make_config, open_test_engine
from tests.modules.test_stream import client_of, event_of
from tests.sdk_workers import VERSIONS, sdk_worker, wait_registered

pytestmark = pytest.mark.sdk


@pytest.mark.parametrize("version", VERSIONS)
async def test_stream_from_sdk(version):
    config = make_config(
        [{"class": "modules::stream::StreamModule", "config": {"port": 0, "host": "127.0.0.1"}}]
    )
    async with open_test_engine(config) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with sdk_worker(
            version,
            url,
            handlers={
                "sdk::on_chat": None,
                "sdk::on_join": {"unauthorized": False},
                "sdk::on_leave": None,
                "stream::get(custom)": {"from": "override"},
                "stream::set(custom)": {"old_value": None, "new_value": {"stored": "elsewhere"}},
            },
            triggers=[
                ["stream", "sdk::on_chat", {"stream_name": "chat", "group_id": "room"}],
                ["stream:join", "sdk::on_join", {}],
                ["stream:leave", "sdk::on_leave", {}],
            ],
        ) as w:
            await wait_registered(engine, ["sdk::on_chat", "stream::set(custom)"], triggers=3)
            async with client_of(engine) as c:
                await c.join("s1", "chat", "room")
                assert (await c.receive())["event"] == {"type": "sync", "data": []}
                item = {"stream_name": "chat", "group_id": "room", "item_id": "m1"}
                assert await w.call("stream::set", {**item, "data": {"text": "hi"}}) == {
                    "old_value": None,
                    "new_value": {"text": "hi"},
                }
                assert event_of(await c.receive()) == (
                    "chat",
                    "room",
                    "m1",
                    {"type": "create", "data": {"text": "hi"}},
                )
                assert await w.call("stream::get", item) == {"text": "hi"}
                result = await w.call(
                    "stream::update",
                    {**item, "ops": [{"type": "set", "path": "read", "value": True}]},
                )
                assert result == {
                    "old_value": {"text": "hi"},
                    "new_value": {"text": "hi", "read": True},
                }
                assert event_of(await c.receive())[3]["type"] == "update"
                assert await w.call(
                    "stream::list", {"stream_name": "chat", "group_id": "room"}
                ) == [{"text": "hi", "read": True}]
                assert await w.call("stream::list_groups", {"stream_name": "chat"}) == ["room"]
                assert await w.call("stream::list_all", {}) == {
                    "stream": [{"id": "chat", "groups": ["room"]}],
                    "count": 1,
                }
                assert (
                    await w.call(
                        "stream::send",
                        {"stream_name": "chat", "group_id": "room", "type": "typing", "data": 1},
                    )
                    is None
                )
                assert (await c.receive())["event"] == {
                    "type": "event",
                    "event": {"type": "typing", "data": 1},
                }
                assert await w.call("stream::delete", item) == {
                    "old_value": {"text": "hi", "read": True}
                }
                assert (await c.receive())["event"]["type"] == "delete"

                # per-stream overrides registered by the worker
                assert await w.call(
                    "stream::get", {"stream_name": "custom", "group_id": "g", "item_id": "i"}
                ) == {"from": "override"}
                await c.join("s2", "custom", "g")
                assert (await c.receive())["event"]["type"] == "sync"
                out = await w.call(
                    "stream::set",
                    {"stream_name": "custom", "group_id": "g", "item_id": "i", "data": 5},
                )
                assert out == {"old_value": None, "new_value": {"stored": "elsewhere"}}
                assert event_of(await c.receive()) == (
                    "custom",
                    "g",
                    "i",
                    {"type": "create", "data": {"stored": "elsewhere"}},
                )
                assert (
                    await w.call("stream::list_groups", {"stream_name": "custom"}) == []
                )  # nothing reached the adapter

            events = await w.wait_events(4, "sdk::on_chat")
            assert sorted(e["event"]["type"] for e in events) == [
                "create",
                "delete",
                "event",
                "update",
            ]
            assert all(e["streamName"] == "chat" and e["groupId"] == "room" for e in events)
            joins = await w.wait_events(2, "sdk::on_join")
            assert joins[0] == {
                "subscription_id": "s1",
                "stream_name": "chat",
                "group_id": "room",
                "id": None,
                "context": None,
            }
            assert len(await w.wait_events(2, "sdk::on_leave")) == 2
