"""The ``open_<kind>_adapter`` factories and the ``adapter`` blocks that choose them.

A block is structured when the config is loaded (``parse_config``): its class
name picks a backend, its ``config`` becomes that backend's config class, and
any error names the file and the full key path.  The factories then open
what the block chose.
"""

from __future__ import annotations

import pytest

from iii.adapters import cron, pubsub, queue, state, stream
from iii.config import parse_config
from iii.config_schema import EMBEDDED
from iii.errors import ConfigError

MODULES = {
    "cron": "modules::cron::CronModule",
    "pubsub": "modules::pubsub::PubSubModule",
    "queue": "modules::queue::QueueModule",
    "state": "modules::state::StateModule",
    "stream": "modules::stream::StreamModule",
}
KINDS = {"cron": cron, "pubsub": pubsub, "queue": queue, "state": state, "stream": stream}
REF_TYPES = {
    "cron": cron.CronAdapterRef,
    "pubsub": pubsub.PubSubAdapterRef,
    "queue": queue.QueueAdapterRef,
    "state": state.StateAdapterRef,
    "stream": stream.StreamAdapterRef,
}
OPENERS = {
    "state": lambda ref: state.open_state_adapter(ref, on_peer_event=print),
    "stream": lambda ref: stream.open_stream_adapter(ref, on_peer_event=print),
    "pubsub": lambda ref: pubsub.open_pubsub_adapter(ref, on_message=print),
    "cron": cron.open_cron_adapter,
    "queue": queue.open_queue_adapter,
}


def adapter_of(kind, block):
    """The module's structured ``adapter`` (from a config listing only that module)."""
    config = parse_config({"modules": [{"class": MODULES[kind], "config": {"adapter": block}}]})
    return config.modules[0].config.adapter


def refused(kind, block):
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"modules": [{"class": MODULES[kind], "config": {"adapter": block}}]}, file="f.yaml"
        )
    assert info.value.file == "f.yaml"
    return info.value


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_unknown_class_is_a_config_error_listing_the_known_ones(kind):
    error = refused(kind, {"class": "modules::nope::Adapter"})
    assert error.key == "modules[0].config.adapter.class"
    assert "modules::nope::Adapter" in error.reason and "modules::" + kind in error.reason
    assert EMBEDDED in error.reason


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_embedded_names_the_default_backend_of_every_kind(kind):
    ref_type = REF_TYPES[kind]
    default = ref_type.default()
    chosen = adapter_of(kind, {"class": EMBEDDED})
    assert chosen == default
    assert chosen.class_name == ref_type.KIND.default  # shown by its upstream name
    # The upstream name is still accepted, and names the same backend.
    assert adapter_of(kind, {"class": ref_type.KIND.default}) == default
    module = KINDS[kind]
    backends = module.BACKENDS
    assert backends[chosen.class_name].open.__module__ == f"iii.adapters.{kind}.embedded"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_unknown_backend_key_is_a_config_error_with_its_full_path(kind):
    error = refused(kind, {"class": EMBEDDED, "config": {"no_such_key": 1}})
    assert error.key == "modules[0].config.adapter.config"
    assert "no_such_key" in error.reason


@pytest.mark.parametrize(
    "kind, block, key",
    [
        ("state", {"class": EMBEDDED, "config": {"file_path": 1}}, "file_path"),
        (
            "stream",
            {"class": "modules::stream::adapters::RedisAdapter", "config": {"timeout_ms": True}},
            "timeout_ms",
        ),
        (
            "pubsub",
            {"class": "modules::pubsub::RedisAdapter", "config": {"redis_url": "http://x"}},
            "redis_url",
        ),
        ("queue", {"class": EMBEDDED, "config": {"max_attempts": 0}}, "max_attempts"),
        (
            "queue",
            {"class": "modules::queue::RabbitMQAdapter", "config": {"queue_mode": "lifo"}},
            "queue_mode",
        ),
        (
            "cron",
            {"class": "modules::cron::RedisCronAdapter", "config": {"lock_ttl_ms": False}},
            "lock_ttl_ms",
        ),
        ("pubsub", {"class": EMBEDDED, "config": ["not", "a", "mapping"]}, None),
    ],
)
def test_a_bad_backend_value_is_a_config_error_naming_its_key(kind, block, key):
    error = refused(kind, block)
    where = "modules[0].config.adapter.config"
    assert error.key == (f"{where}.{key}" if key else where)


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_no_adapter_block_opens_the_default_backend(kind):
    async with OPENERS[kind](None) as adapter:
        assert type(adapter).__module__ == f"iii.adapters.{kind}.embedded"


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_a_structured_block_opens_its_backend_with_its_config(kind, tmp_path):
    ref = adapter_of(kind, {"class": EMBEDDED})
    async with OPENERS[kind](ref) as adapter:
        assert type(adapter).__module__ == f"iii.adapters.{kind}.embedded"


async def test_a_hand_made_ref_with_the_wrong_config_class_is_refused():
    ref = queue.QueueAdapterRef(class_name=queue.DEFAULT_ADAPTER, config={"max_attempts": 2})
    with pytest.raises(TypeError, match="takes a Config"):
        async with queue.open_queue_adapter(ref):
            pass


def test_the_rabbitmq_upstream_key_names_apply_unless_ours_are_given():
    rabbit = "modules::queue::RabbitMQAdapter"
    ref = adapter_of(
        "queue", {"class": rabbit, "config": {"prefetch_count": 3, "queue_mode": "fifo"}}
    )
    assert ref.config.defaults.concurrency == 3 and ref.config.defaults.fifo
    ref = adapter_of("queue", {"class": rabbit, "config": {"prefetch_count": 3, "concurrency": 5}})
    assert ref.config.defaults.concurrency == 5
