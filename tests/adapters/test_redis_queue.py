"""The Redis queue backend on a real Redis, beyond the shared queue contract
(``tests/adapters/test_queue_contract.py``): entries it did not write itself."""

from __future__ import annotations

import uuid

import coredis
import pytest
import trio

from iii.adapters.queue import Job
from iii.adapters.queue.redis import Config, open_adapter
from tests.support import require_redis

pytestmark = pytest.mark.services


async def test_an_undecodable_entry_goes_to_the_dlq_and_the_next_job_is_delivered():
    url = require_redis()
    prefix = f"iiitest:{uuid.uuid4().hex[:8]}:"
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        try:
            with trio.fail_after(30):
                async with open_adapter(Config(redis_url=url, key_prefix=prefix), None) as adapter:
                    async with adapter.open_consumer("q", "c", 1) as consumer:
                        await client.xadd(f"{prefix}q:stream", {"job": "{not json"})
                        await client.xadd(f"{prefix}q:stream", {"job": '{"no": "id"}'})
                        await adapter.enqueue(Job(id="good", queue="q", data={"n": 1}))
                        delivery = None
                        while delivery is None:
                            delivery = await consumer.receive(1)
                        assert delivery.job.id == "good"
                        await consumer.ack(delivery)
                    letters, total = await adapter.dlq_messages("q", 0, 10)
                    assert total == 2
                    assert all(letter.error == "undecodable message" for letter in letters)
                    stats = await adapter.stats("q")
                    assert (stats.waiting, stats.active, stats.dlq) == (0, 0, 2)
        finally:
            keys = [key async for key in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(keys)
