"""The embedded queue backend's log, beyond the shared queue contract
(``tests/adapters/test_queue_contract.py``, and the module on it in
``tests/modules/test_queue.py``): compaction racing with writes, and
records too large for the log."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from iii.adapters.limits import ValueTooLargeError
from iii.adapters.queue import Job
from iii.adapters.queue.embedded import DLQ_ERROR_LIMIT, Config, open_adapter


async def test_a_job_enqueued_while_a_compaction_waits_survives_a_restart(tmp_path):
    config = Config(store_method="file_based", file_path=str(tmp_path))
    async with open_adapter(config, None) as adapter:
        await adapter.enqueue(Job(id="before", queue="q", data=1))
        record_log = adapter.record_log
        assert record_log is not None
        async with trio.open_nursery() as nursery:
            # Hold the flush lock as a slow write would, so the compaction
            # and then the enqueue both queue up behind it.
            async with record_log._lock:
                nursery.start_soon(adapter._compact)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(adapter.enqueue, Job(id="during", queue="q", data=2))
                await trio.testing.wait_all_tasks_blocked()
    async with open_adapter(config, None) as adapter:
        assert sorted(adapter.queues["q"].jobs) == ["before", "during"]


async def test_a_job_the_log_could_not_keep_is_refused_and_a_kept_one_always_fits(tmp_path):
    # issue 10 row 4: a job's records (enqueue, retry, dead letter) must all
    # fit the log's record limit, made small here.
    config = Config(store_method="file_based", file_path=str(tmp_path))
    async with open_adapter(config, None) as adapter:
        assert adapter.record_log is not None
        adapter.record_log.max_record = 40_000
        with pytest.raises(ValueTooLargeError) as refused:
            await adapter.enqueue(Job(id="huge", queue="q", data="x" * 20_000))
        assert refused.value.code == "VALUE_TOO_LARGE"
        assert "q" not in adapter.queues  # nothing was made for it
        await adapter.enqueue(Job(id="big", queue="q", data="x" * 14_000))
        async with adapter.open_consumer("q", "c", 1) as consumer:
            delivery = await consumer.receive(1)
            assert delivery is not None
            await consumer.retry(delivery, attrs.evolve(delivery.job, attempts_made=1), 0)
            delivery = await consumer.receive(5)
            assert delivery is not None
            # A worker's error can be as large as a frame, and escapes to 6 bytes a character.
            await consumer.dead_letter(delivery, delivery.job, "\x00" * 1_000_000)
    async with open_adapter(config, None) as adapter:
        letters, total = await adapter.dlq_messages("q", 0, 10)
        assert total == 1 and letters[0].job.id == "big" and letters[0].job.data == "x" * 14_000
        assert letters[0].error.startswith("\x00" * DLQ_ERROR_LIMIT)
        assert adapter.queues["q"].jobs == {}
