"""``publish`` and the ``subscribe`` trigger from official SDK workers."""

from __future__ import annotations

import pytest

from iii.testing import make_config, open_test_engine
from tests.sdk_workers import VERSIONS, SdkCallError, sdk_worker, wait_registered

pytestmark = pytest.mark.sdk


@pytest.mark.parametrize("version", VERSIONS)
async def test_publish_reaches_every_sdk_subscriber(version):
    config = make_config([{"class": "modules::pubsub::PubSubModule", "config": {}}])
    async with open_test_engine(config) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with sdk_worker(
            version,
            url,
            handlers={"sdk::sub1": None, "sdk::sub2": None},
            triggers=[
                ["subscribe", "sdk::sub1", {"topic": "orders"}],
                ["subscribe", "sdk::sub2", {"topic": "orders"}],
            ],
        ) as w:
            await wait_registered(engine, ["sdk::sub1", "sdk::sub2"], triggers=2)
            assert (
                await w.call("publish", {"topic": "orders", "data": {"id": 7, "items": ["a"]}})
                is None
            )
            assert await w.wait_events(1, "sdk::sub1") == [{"id": 7, "items": ["a"]}]
            assert await w.wait_events(1, "sdk::sub2") == [{"id": 7, "items": ["a"]}]
            with pytest.raises(SdkCallError) as caught:
                await w.call("publish", {"topic": "", "data": 1})
            assert caught.value.code == "topic_not_set", caught.value.message
