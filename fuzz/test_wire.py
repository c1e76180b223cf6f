"""Random and hostile frames from several workers: the engine never crashes,
never leaks a task or a registration, and keeps serving everyone else.

One trio run per example (no hypothesis-trio).  Workers connect over
in-memory streams, send a random sequence of valid messages (with ids drawn
from a small set so that they collide), garbage, binary and telemetry frames,
and disconnect at random points.  Afterwards a fresh worker must still get
``pong`` and a result from ``engine::functions::list``, and once everyone has
left the engine must hold nothing: no connection, worker, function, trigger,
pending call, or extra task.
"""

from __future__ import annotations

import orjson
import trio
from hypothesis import given
from hypothesis import strategies as st

from fuzz.strategies import json_values, uuids
from iii.testing import connect_test_worker, make_config, open_test_engine

FUNCTION_IDS = st.sampled_from(
    ["f::a", "f::b", "engine::functions::list", "engine::workers::list", "engine::channels::create"]
)
TRIGGER_TYPES = st.sampled_from(
    ["webhook", "tick", "engine::workers-available", "engine::functions-available", "nope"]
)

valid_messages = st.one_of(
    st.builds(lambda i: {"type": "registerfunction", "id": i}, FUNCTION_IDS),
    st.builds(lambda i: {"type": "unregisterfunction", "id": i}, FUNCTION_IDS),
    st.builds(
        lambda i, d: {"type": "registertriggertype", "id": i, "description": d},
        TRIGGER_TYPES,
        st.text(max_size=5),
    ),
    st.builds(lambda i: {"type": "unregistertriggertype", "id": i}, TRIGGER_TYPES),
    st.builds(
        lambda i, t, f, c: {
            "type": "registertrigger",
            "id": i,
            "trigger_type": t,
            "function_id": f,
            "config": c,
        },
        st.sampled_from(["t1", "t2"]),
        TRIGGER_TYPES,
        FUNCTION_IDS,
        st.sampled_from([None, {}, {"a": 1}]),
    ),
    st.builds(
        lambda i: {"type": "unregistertrigger", "id": i}, st.sampled_from(["t1", "t2", "t3"])
    ),
    st.builds(
        lambda f, d, i, a: {
            "type": "invokefunction",
            "function_id": f,
            "data": d,
            "invocation_id": i,
            "action": a,
        },
        FUNCTION_IDS,
        json_values,
        st.none() | uuids,
        st.sampled_from([None, {"type": "void"}, {"type": "enqueue", "queue": "q"}, "weird"]),
    ),
    st.builds(
        lambda i, f, r: {
            "type": "invocationresult",
            "invocation_id": i,
            "function_id": f,
            "result": r,
        },
        uuids,
        FUNCTION_IDS,
        json_values,
    ),
    st.builds(lambda: {"type": "ping"}),
    st.builds(lambda p: {"type": "reattach", "previous_worker_id": p}, uuids),
    st.builds(lambda i: {"type": "registerservice", "id": i}, st.text(max_size=5)),
)
hostile_frames = st.one_of(
    st.text(max_size=30),
    st.binary(max_size=30),
    st.builds(lambda b: b"OTLP" + b, st.binary(max_size=20)),
    st.builds(lambda v: orjson.dumps(v).decode(), json_values),
    st.dictionaries(
        st.sampled_from(["type", "id", "function_id", "invocation_id", "data"]),
        json_values,
        max_size=4,
    ).map(lambda d: orjson.dumps(d).decode()),
)
frames = valid_messages.map(lambda m: orjson.dumps(m).decode()) | hostile_frames
ops = st.lists(st.tuples(st.integers(0, 2), st.one_of(frames, st.just("DISCONNECT"))), max_size=30)


async def _scenario(sequence: list[tuple[int, object]]) -> None:
    config = make_config(invocation_timeout_ms=2000)
    async with open_test_engine(config) as engine:
        assert engine.connection_nursery is not None
        baseline_tasks = len(engine.connection_nursery.child_tasks)
        async with trio.open_nursery() as clients:
            inboxes: list[trio.MemorySendChannel] = []
            done = trio.Event()

            async def client(inbox: trio.MemoryReceiveChannel) -> None:
                async with connect_test_worker(engine) as worker:
                    async for frame in inbox:
                        if frame == "DISCONNECT":
                            return
                        await worker.send(frame)
                    await done.wait()

            for _ in range(3):
                send, receive = trio.open_memory_channel(100)
                inboxes.append(send)
                clients.start_soon(client, receive)
            for index, frame in sequence:
                try:
                    await inboxes[index].send(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await trio.sleep(0.05)

            # Everyone else is still served.
            async with connect_test_worker(engine) as probe:
                await probe.send({"type": "ping"})
                assert await probe.receive_type("pong", timeout=5) == {"type": "pong"}
                reply = await probe.call("engine::functions::list", {}, timeout=5)
                assert "functions" in reply["result"]

            for inbox in inboxes:
                inbox.close()
            done.set()

        with trio.fail_after(10):
            while engine.connections or len(engine.pending) or engine.inflight:
                await trio.sleep(0.01)
            while len(engine.connection_nursery.child_tasks) > baseline_tasks:
                await trio.sleep(0.01)
        registry = engine.registry
        assert not registry.workers and not registry.registrations and not registry.triggers
        assert all(
            None in entry.replicas for entry in registry.functions.values()
        )  # only engine functions
        assert all(t.provider is None for t in registry.trigger_types.values())


# An example takes well under a second; a hang becomes a failing example
# that hypothesis can shrink, instead of a stuck test run.
SCENARIO_LIMIT = 60


async def _bounded_scenario(sequence: list[tuple[int, object]]) -> None:
    with trio.fail_after(SCENARIO_LIMIT):
        await _scenario(sequence)


@given(sequence=ops)
def test_hostile_workers_cannot_break_the_engine(sequence):
    trio.run(_bounded_scenario, sequence)
