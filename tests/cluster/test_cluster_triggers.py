"""Each trigger type with three engines on one Redis: each event is handled once.

The same trigger is registered by workers on engines B and C (replicas, as a
scaled-out deployment does), and the events are made through engine A.  After
the counted events, a marker event is made and awaited; then each event
must have been handled exactly once, by one of the two workers.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from iii.engine import Engine
from iii.testing import RawWorker, connect_test_worker, open_test_engine
from tests.backends import delete_prefix
from tests.cluster.helpers import cluster_config, new_cluster_name, wait_for, wait_full_view
from tests.cluster.processes import shared_modules

# Cluster membership lives in Redis.
pytestmark = pytest.mark.services

EVENTS = 12


@asynccontextmanager
async def three_engines() -> AsyncIterator[list[Engine]]:
    name, prefix = new_cluster_name(), f"iiitest:{uuid.uuid4().hex[:8]}:"
    modules = shared_modules(prefix)
    try:
        async with AsyncExitStack() as stack:
            engines = [
                await stack.enter_async_context(
                    open_test_engine(cluster_config(name, modules=modules))
                )
                for _ in range(3)
            ]
            await wait_full_view(engines)
            yield engines
    finally:
        await delete_prefix(prefix)


class Handled:
    """What the workers were called with, per function."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []  # (worker, function_id, data)
        self.changed = trio.Event()

    def add(self, worker: str, function_id: str, data: Any) -> None:
        self.calls.append((worker, function_id, data))
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()


async def serve(worker: RawWorker, name: str, handled: Handled, result: Any = None) -> None:
    while True:
        message = await worker.receive_type("invokefunction", timeout=3600)
        handled.add(name, message["function_id"], message.get("data"))
        if message.get("invocation_id"):
            await worker.send(
                {
                    "type": "invocationresult",
                    "invocation_id": message["invocation_id"],
                    "function_id": message["function_id"],
                    "result": result(message.get("data")) if callable(result) else result,
                }
            )


@asynccontextmanager
async def replicas(
    engines: list[Engine], function_id: str, trigger_type: str, config: Any, result: Any = None
) -> AsyncIterator[tuple[Handled, RawWorker]]:
    """Workers on B and C, each with ``function_id`` and the same trigger; yields a caller on A."""
    a, b, c = engines
    handled = Handled()
    async with (
        connect_test_worker(b) as on_b,
        connect_test_worker(c) as on_c,
        connect_test_worker(a) as on_a,
        trio.open_nursery() as nursery,
    ):
        for worker, name in ((on_b, "b"), (on_c, "c")):
            await worker.send({"type": "registerfunction", "id": function_id})
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": str(uuid.uuid4()),
                    "trigger_type": trigger_type,
                    "function_id": function_id,
                    "config": config,
                }
            )
            nursery.start_soon(serve, worker, name, handled, result)
        # Every engine knows both registrations (the catalogs are synced).
        await wait_for(
            lambda: all(
                sum(
                    1
                    for p in e.cluster.peers.values()
                    if function_id in (p.catalog.functions if p.catalog else {})
                )  # type: ignore[union-attr]
                == (2 if e is a else 1)
                for e in engines
            )
        )
        await wait_for(lambda: all(len(p.trigger_keys) >= 1 for p in a.cluster.peers.values()))  # type: ignore[union-attr]
        yield handled, on_a
        nursery.cancel_scope.cancel()


def assert_once_each(
    handled: Handled, function_id: str, keys: list[Any], key_of: Callable[[Any], Any]
) -> None:
    seen = Counter(key_of(data) for _, fid, data in handled.calls if fid == function_id)
    assert {k: seen[k] for k in keys} == {k: 1 for k in keys}, seen
    assert sum(seen.values()) == len(keys), seen


async def test_state_changes_fire_once() -> None:
    async with three_engines() as engines:
        scope = f"s{uuid.uuid4().hex[:6]}"
        async with replicas(engines, "t::on_state", "state", {"scope": scope}) as (handled, caller):
            keys = [f"k{i}" for i in range(EVENTS)] + ["marker"]
            for key in keys:
                answer = await caller.call("state::set", {"scope": scope, "key": key, "value": 1})
                assert answer.get("error") is None, answer
            await handled.wait(lambda: any(d["key"] == "marker" for _, _, d in handled.calls))
            assert_once_each(handled, "t::on_state", keys, lambda d: d["key"])


async def test_stream_changes_fire_once() -> None:
    async with three_engines() as engines:
        stream = f"st{uuid.uuid4().hex[:6]}"
        async with replicas(engines, "t::on_stream", "stream", {"stream_name": stream}) as (
            handled,
            caller,
        ):
            items = [f"i{i}" for i in range(EVENTS)] + ["marker"]
            for item in items:
                answer = await caller.call(
                    "stream::set",
                    {"stream_name": stream, "group_id": "g", "item_id": item, "data": {"v": 1}},
                )
                assert answer.get("error") is None, answer
            await handled.wait(lambda: any(d.get("id") == "marker" for _, _, d in handled.calls))
            assert_once_each(handled, "t::on_stream", items, lambda d: d.get("id"))


async def test_pubsub_messages_reach_each_subscriber_once() -> None:
    async with three_engines() as engines:
        topic = f"t{uuid.uuid4().hex[:6]}"
        async with replicas(engines, "t::on_message", "subscribe", {"topic": topic}) as (
            handled,
            caller,
        ):
            numbers = list(range(EVENTS)) + ["marker"]
            for n in numbers:
                answer = await caller.call("publish", {"topic": topic, "data": {"n": n}})
                assert answer.get("error") is None, answer
            await handled.wait(lambda: any(d["n"] == "marker" for _, _, d in handled.calls))
            assert_once_each(handled, "t::on_message", numbers, lambda d: d["n"])


async def test_queue_jobs_are_handled_once() -> None:
    async with three_engines() as engines:
        topic = f"q{uuid.uuid4().hex[:6]}"
        async with replicas(
            engines, "t::on_job", "queue", {"topic": topic}, result={"ok": True}
        ) as (handled, caller):
            numbers = list(range(EVENTS))
            for n in numbers:
                answer = await caller.call("enqueue", {"topic": topic, "data": {"n": n}})
                assert answer.get("error") is None, answer
            await handled.wait(lambda: len(handled.calls) >= EVENTS)
            # Every job ran; a second delivery would need a failed ack (none here).
            assert_once_each(handled, "t::on_job", numbers, lambda d: d["n"])


async def test_cron_ticks_fire_once() -> None:
    async with three_engines() as engines:
        async with replicas(engines, "t::on_tick", "cron", {"expression": "* * * * * *"}) as (
            handled,
            _,
        ):
            await handled.wait(lambda: len({d["scheduled_time"] for _, _, d in handled.calls}) >= 3)
            ticks = Counter(d["scheduled_time"] for _, _, d in handled.calls)
            assert all(count == 1 for count in ticks.values()), ticks


async def test_http_requests_are_served_once_by_the_engine_they_reach() -> None:
    async with three_engines() as engines:
        path = f"/h{uuid.uuid4().hex[:6]}"
        result = {"status_code": 200, "body": {"ok": True}}
        config = {"api_path": path, "http_method": "POST"}
        async with replicas(engines, "t::on_request", "http", config, result=result) as (
            handled,
            _,
        ):
            await wait_for(lambda: all(len(e.modules["rest_api"].routes) == 1 for e in engines))
            async with httpx.AsyncClient() as client:
                for n in range(EVENTS):
                    port = engines[n % 3].modules["rest_api"].port
                    response = await client.post(f"http://127.0.0.1:{port}{path}", json={"n": n})
                    assert response.status_code == 200, response.text
            assert_once_each(
                handled, "t::on_request", list(range(EVENTS)), lambda d: d["body"]["n"]
            )


async def test_stream_join_fires_once_for_a_client_on_another_engine() -> None:
    async with three_engines() as engines:
        stream = f"j{uuid.uuid4().hex[:6]}"
        async with replicas(
            engines, "t::on_join", "stream:join", {"stream_name": stream}, result={}
        ) as (handled, _):
            await wait_for(lambda: all(e.modules["stream"].join_triggers.triggers for e in engines))  # type: ignore[attr-defined]
            port = engines[0].modules["stream"].server.listen_port
            from trio_websocket import open_websocket_url

            for n in range(3):
                async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send_message(
                        '{"type": "join", "data": {"subscriptionId": "s%d", "streamName": "%s", "groupId": "g"}}'
                        % (n, stream)
                    )
                    await handled.wait(
                        lambda n=n: any(
                            d.get("subscription_id") == f"s{n}" for _, _, d in handled.calls
                        )
                    )
            assert_once_each(
                handled, "t::on_join", ["s0", "s1", "s2"], lambda d: d.get("subscription_id")
            )


async def test_stream_leave_fires_once_for_a_client_on_another_engine() -> None:
    async with three_engines() as engines:
        stream = f"l{uuid.uuid4().hex[:6]}"
        async with replicas(
            engines, "t::on_leave", "stream:leave", {"stream_name": stream}, result={}
        ) as (handled, _):
            await wait_for(
                lambda: all(e.modules["stream"].leave_triggers.triggers for e in engines)
            )  # type: ignore[attr-defined]
            port = engines[0].modules["stream"].server.listen_port
            from trio_websocket import open_websocket_url

            for n in range(3):
                async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send_message(
                        '{"type": "join", "data": {"subscriptionId": "s%d", "streamName": "%s", "groupId": "g"}}'
                        % (n, stream)
                    )
                    await ws.get_message()  # joined: the first sync of the group
                await handled.wait(  # the client left with its socket
                    lambda n=n: any(
                        d.get("subscription_id") == f"s{n}" for _, _, d in handled.calls
                    )
                )
            assert_once_each(
                handled, "t::on_leave", ["s0", "s1", "s2"], lambda d: d.get("subscription_id")
            )


async def test_fire_and_forget_and_enqueued_calls_to_another_engine_run_once() -> None:
    async with three_engines() as engines:
        a, b, c = engines
        handled = Handled()
        queue = f"q{uuid.uuid4().hex[:6]}"
        async with (
            connect_test_worker(b) as on_b,
            connect_test_worker(c) as on_c,
            connect_test_worker(a) as caller,
            trio.open_nursery() as nursery,
        ):
            for worker, name in ((on_b, "b"), (on_c, "c")):
                await worker.send({"type": "registerfunction", "id": "t::work"})
                nursery.start_soon(serve, worker, name, handled, {"ok": True})
            await wait_for(
                lambda: (
                    "t::work" in a.registry.functions
                    and len(a.registry.functions["t::work"].replicas) == 2
                )
            )
            for n in range(EVENTS):
                await caller.send(
                    {"type": "invokefunction", "function_id": "t::work", "data": {"n": f"v{n}"}}
                )
                answer = await caller.call(
                    "t::work",
                    {"n": f"e{n}"},
                    action={"type": "enqueue", "queue": queue},
                    timeout=10,
                )
                assert answer.get("error") is None and answer["result"]["messageReceiptId"], answer
            keys = [f"{how}{n}" for n in range(EVENTS) for how in "ve"]
            await handled.wait(lambda: len(handled.calls) >= len(keys))
            assert_once_each(handled, "t::work", keys, lambda d: d["n"])
            assert {worker for worker, _, _ in handled.calls} <= {"b", "c"}
            nursery.cancel_scope.cancel()
