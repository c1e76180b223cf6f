"""A Redis outage: callers get ``adapter_unavailable``, the engine keeps serving,
and the adapters (commands and pub/sub) come back by themselves.

Uses a private redis-server on a free port, so stopping it disturbs nobody.
"""

from __future__ import annotations

import gc
import shutil
import subprocess

import pytest
import trio

from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.support import reserve_port, services_required, wait_for_port

pytestmark = [
    pytest.mark.services,
    # coredis 6.9 does not close the memory streams of a connection that Redis
    # dropped; they are only garbage.  Collected inside the test (gc.collect
    # below) so this filter applies to them and to nothing else.
    pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def start_redis(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


async def test_outage_is_reported_and_recovered():
    if shutil.which("redis-server") is None:
        if services_required():
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    port = reserve_port()
    url = f"redis://127.0.0.1:{port}"
    redis = start_redis(port)
    try:
        await wait_for_port(port)
        adapter = {"config": {"redis_url": url, "timeout_ms": 1000}}
        config = make_config(
            [
                {
                    "class": "modules::state::StateModule",
                    "config": {
                        "adapter": {"class": "modules::state::adapters::RedisAdapter", **adapter}
                    },
                },
                {
                    "class": "modules::pubsub::PubSubModule",
                    "config": {"adapter": {"class": "modules::pubsub::RedisAdapter", **adapter}},
                },
                {"class": "modules::kv_server::KvServer", "config": {}},
            ]
        )
        async with open_test_engine(config) as engine, connect_test_worker(engine) as w:
            await w.send({"type": "registerfunction", "id": "w::sub"})
            await w.send(
                {
                    "type": "registertrigger",
                    "id": "t",
                    "trigger_type": "subscribe",
                    "function_id": "w::sub",
                    "config": {"topic": "news"},
                }
            )
            assert "error" not in await w.call("state::set", {"scope": "s", "key": "k", "value": 1})

            stop(redis)
            reply = await w.call("state::set", {"scope": "s", "key": "k", "value": 2})
            assert reply["error"]["code"] == "adapter_unavailable", reply
            assert (await w.call("state::get", {"scope": "s", "key": "k"}))["error"][
                "code"
            ] == "adapter_unavailable"
            assert (await w.call("publish", {"topic": "news", "data": 1}))["error"][
                "code"
            ] == "adapter_unavailable"
            # everything else keeps working
            assert "error" not in await w.call(
                "kv_server::set", {"index": "i", "key": "k", "value": 1}
            )
            assert "functions" in (await w.call("engine::functions::list", {}))["result"]

            redis = start_redis(port)
            await wait_for_port(port)
            with trio.fail_after(20):
                while "error" in (
                    reply := await w.call("state::set", {"scope": "s", "key": "k", "value": 3})
                ):
                    assert reply["error"]["code"] == "adapter_unavailable"
                    await trio.sleep(0.2)
            assert reply["result"] == {
                "old_value": None,
                "new_value": 3,
            }  # the new Redis started empty
            # the pub/sub subscription came back too: a publish reaches the trigger
            with trio.fail_after(20):
                while True:
                    assert "error" not in await w.call("publish", {"topic": "news", "data": "back"})
                    with trio.move_on_after(0.5):
                        message = await w.receive_type("invokefunction", timeout=1)
                        break
            assert message["function_id"] == "w::sub" and message["data"] == "back"
    finally:
        stop(redis)
        gc.collect()


async def test_cron_lock_reports_an_outage_as_adapter_unavailable():
    """Whatever the connection's failure looks like from coredis/anyio (a
    refused connect, a reset stream, an exception group), the cron adapter
    answers adapter_unavailable, which the cron module logs and skips."""
    if shutil.which("redis-server") is None:
        if services_required():
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    from iii.adapters.cron.redis import Config, open_adapter
    from iii.errors import AdapterUnavailableError

    port = reserve_port()
    redis = start_redis(port)
    try:
        await wait_for_port(port)
        async with open_adapter(Config(redis_url=f"redis://127.0.0.1:{port}"), None) as locks:
            assert await locks.try_lock("job:1") is True
            assert await locks.try_lock("job:1") is False
            stop(redis)
            for attempt in range(3):  # the dropped connection, then reconnects that are refused
                with pytest.raises(AdapterUnavailableError):
                    await locks.try_lock(f"job:{attempt + 2}")
            redis = start_redis(port)
            await wait_for_port(port)
            with trio.fail_after(10):
                while True:
                    try:
                        assert await locks.try_lock("job:after") is True
                        break
                    except AdapterUnavailableError:
                        await trio.sleep(0.1)
        gc.collect()
    finally:
        stop(redis)
