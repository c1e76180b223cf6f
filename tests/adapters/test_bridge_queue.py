"""The Bridge queue adapter: jobs kept by a backend engine's queue, run here
(:mod:`tests.adapters.bridge_support`).

A job enqueued through the bridge engine is stored on the backend and runs
with the bridge engine's handler (raw workers, and SDK 0.4.1 / 0.25.0
workers); a link drop while a job runs (the backend killed and restarted on
its file store) loses nothing: the cut-off job runs again.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from iii.testing import connect_test_worker, open_test_engine
from tests.adapters.bridge_support import (
    answer_jobs,
    backend_config,
    backend_process,
    bridge_config,
    called,
    connected,
    ok,
    raw_worker_at,
    topic_stats,
    wait_for,
)
from tests.sdk_workers import SCRIPTS, command
from tests.support import EngineProcess, start_sdk_worker


async def test_queue_job_enqueued_through_the_bridge_runs(tmp_path):
    async with (
        backend_process(tmp_path) as backend,
        open_test_engine(bridge_config(backend.url)) as bridge,
    ):
        await wait_for(lambda: connected(bridge, "queue"))
        async with connect_test_worker(bridge) as handler, connect_test_worker(bridge) as caller:
            await handler.send({"type": "registerfunction", "id": "jobs::run"})
            await handler.send(
                {
                    "type": "registertrigger",
                    "id": "q1",
                    "trigger_type": "queue",
                    "function_id": "jobs::run",
                    "config": {"topic": "orders"},
                }
            )
            await wait_for(lambda: len(bridge.registry.triggers) == 1)
            seen: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_jobs, handler, seen)
                assert (
                    ok(await caller.call("enqueue", {"topic": "orders", "data": {"n": 1}})) is None
                )
                await wait_for(lambda: seen == [{"n": 1}])
                # the job was kept by the backend's queue, and is done there
                async with raw_worker_at(backend.port) as on_backend:
                    topics = ok(await on_backend.call("engine::queue::list_topics", {}))
                    assert "orders" in json.dumps(topics)
                nursery.cancel_scope.cancel()


async def test_queue_link_drop_during_a_job_loses_nothing(tmp_path):
    (tmp_path / "queue").mkdir()
    backend = EngineProcess.write(tmp_path, backend_config(tmp_path / "queue"))
    backend.start()
    try:
        await backend.started()
        async with open_test_engine(bridge_config(backend.url)) as bridge:
            await wait_for(lambda: connected(bridge, "queue"))
            async with (
                connect_test_worker(bridge) as handler,
                connect_test_worker(bridge) as caller,
            ):
                await handler.send({"type": "registerfunction", "id": "jobs::run"})
                await handler.send(
                    {
                        "type": "registertrigger",
                        "id": "q1",
                        "trigger_type": "queue",
                        "function_id": "jobs::run",
                        "config": {"topic": "orders"},
                    }
                )
                await wait_for(lambda: len(bridge.registry.triggers) == 1)
                seen: list[Any] = []
                held = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answer_jobs, handler, seen, held)
                    for n in range(3):
                        ok(await caller.call("enqueue", {"topic": "orders", "data": {"n": n}}))
                    await held.wait()  # one job is running here when the link drops
                    backend.kill()
                    await wait_for(lambda: not bridge.modules["queue"].adapter.link.connected)
                    backend.start()
                    await backend.started()
                    # every job ran to an answer; the cut-off one ran again
                    await wait_for(
                        lambda: (
                            all(seen[1:].count({"n": n}) >= 1 for n in range(3)) and len(seen) >= 4
                        ),
                        timeout=60,
                    )
                    assert seen.count(seen[0]) >= 2
                    nursery.cancel_scope.cancel()
                stats = await topic_stats(backend.port, "orders")
                assert stats.get("dlq", 0) == 0, stats
    finally:
        backend.kill()


@pytest.mark.sdk
@pytest.mark.parametrize("version", ["0.4.1", "0.25.0"])
async def test_sdk_worker_job_through_the_bridge_queue_runs(tmp_path, version):
    async with (
        backend_process(tmp_path) as backend,
        open_test_engine(bridge_config(backend.url)) as bridge,
    ):
        await wait_for(lambda: connected(bridge, "queue"))
        async with start_sdk_worker(
            version, SCRIPTS[version], url=f"ws://127.0.0.1:{bridge.listen_port}"
        ) as worker:
            await worker.wait_for("READY", timeout=60)
            assert (await command(worker, op="register", id="jobs::run"))[0] == "OK"
            await command(
                worker, op="trigger", type="queue", fn="jobs::run", config={"topic": "orders"}
            )
            await wait_for(lambda: len(bridge.registry.triggers) == 1)
            assert await command(
                worker, op="call", fn="enqueue", data={"topic": "orders", "data": {"order": 7}}
            ) == ("OK", None)
            assert called(await worker.wait_for("CALLED jobs::run", timeout=30)) == {"order": 7}
            # the backend kept the job, and it is done there
            with trio.fail_after(20):
                while (stats := await topic_stats(backend.port, "orders"))["waiting"] or stats[
                    "active"
                ]:
                    await trio.sleep(0.05)
            assert stats["dlq"] == 0


async def test_a_job_cut_off_by_its_worker_leaving_does_not_count_an_attempt(tmp_path):
    """The backend allows one attempt: a job whose worker on the bridge engine left
    mid-job must come back (released, not failed) and run on the next worker."""
    (tmp_path / "queue").mkdir()
    config = backend_config(tmp_path / "queue")
    config["modules"][-1]["config"]["adapter"]["config"]["max_attempts"] = 1
    backend = EngineProcess.write(tmp_path, config)
    backend.start()
    try:
        await backend.started()
        async with (
            open_test_engine(bridge_config(backend.url)) as bridge,
            connect_test_worker(bridge) as caller,
        ):
            await wait_for(lambda: connected(bridge, "queue"))
            trigger = {
                "type": "registertrigger",
                "id": "q1",
                "trigger_type": "queue",
                "function_id": "jobs::run",
                "config": {"topic": "orders"},
            }
            async with connect_test_worker(bridge) as first:
                await first.send({"type": "registerfunction", "id": "jobs::run"})
                await first.send(trigger)
                await wait_for(lambda: len(bridge.registry.triggers) == 1)
                ok(await caller.call("enqueue", {"topic": "orders", "data": {"n": 1}}))
                message = await first.receive_type("invokefunction", timeout=30)
                assert message["data"] == {"n": 1}
            # the first worker left without answering
            async with connect_test_worker(bridge) as second:
                await second.send({"type": "registerfunction", "id": "jobs::run"})
                await second.send(trigger)
                seen: list[Any] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answer_jobs, second, seen)
                    await wait_for(lambda: seen == [{"n": 1}], timeout=60)
                    nursery.cancel_scope.cancel()
            stats = await topic_stats(backend.port, "orders")
            assert stats["dlq"] == 0, stats
    finally:
        backend.kill()
