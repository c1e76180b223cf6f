"""The builtin queue backend's log, beyond the shared queue contract
(``tests/modules/test_queue.py``): compaction racing with writes."""

from __future__ import annotations

import trio
import trio.testing

from iii.adapters.queue import Job
from iii.adapters.queue.builtin import open_adapter


async def test_a_job_enqueued_while_a_compaction_waits_survives_a_restart(tmp_path):
    config = {"store_method": "file_based", "file_path": str(tmp_path)}
    async with open_adapter(config) as adapter:
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
    async with open_adapter(config) as adapter:
        assert sorted(adapter.queues["q"].jobs) == ["before", "during"]
