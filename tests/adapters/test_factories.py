"""The ``open_<kind>_adapter`` factories: upstream class names to backends."""

from __future__ import annotations

import pytest

from iii.adapters.cron import open_cron_adapter
from iii.adapters.pubsub import open_pubsub_adapter
from iii.adapters.queue import open_queue_adapter
from iii.adapters.state import open_state_adapter
from iii.adapters.stream import open_stream_adapter
from iii.config import AdapterRef
from iii.errors import ConfigError

UNKNOWN = AdapterRef(class_name="modules::nope::Adapter")
KV_STATE = "modules::state::adapters::KvStore"
REDIS_STREAM = "modules::stream::adapters::RedisAdapter"
REDIS_PUBSUB = "modules::pubsub::RedisAdapter"

OPENERS = {
    "state": lambda ref: open_state_adapter(ref, on_peer_event=print),
    "stream": lambda ref: open_stream_adapter(ref, on_peer_event=print),
    "pubsub": lambda ref: open_pubsub_adapter(ref, on_message=print),
    "cron": open_cron_adapter,
    "queue": open_queue_adapter,
}


@pytest.mark.parametrize("kind", sorted(OPENERS))
async def test_an_unknown_class_is_a_config_error_listing_the_known_ones(kind):
    with pytest.raises(ConfigError) as info:
        async with OPENERS[kind](UNKNOWN):
            pass
    assert "modules::nope::Adapter" in str(info.value) and "modules::" + kind in str(info.value)


@pytest.mark.parametrize("kind", sorted(OPENERS))
async def test_no_adapter_block_opens_the_default_backend(kind):
    async with OPENERS[kind](None) as adapter:
        assert adapter is not None


@pytest.mark.parametrize(
    "kind, ref, key",
    [
        ("state", AdapterRef(class_name=KV_STATE, config={"file_path": 1}), "file_path"),
        ("stream", AdapterRef(class_name=REDIS_STREAM, config={"timeout_ms": True}), "timeout_ms"),
        ("pubsub", AdapterRef(class_name=REDIS_PUBSUB, config=["not", "a", "mapping"]), None),
    ],
)
async def test_a_mistyped_backend_key_is_a_config_error_naming_it(kind, ref, key):
    with pytest.raises(ConfigError) as info:
        async with OPENERS[kind](ref):
            pass
    where = f"{kind}.adapter.config"
    assert info.value.key == (f"{where}.{key}" if key else where)
