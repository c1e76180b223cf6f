"""The state module through a raw worker, on every backend (memory, file, Redis)."""

from __future__ import annotations

import pytest
import trio

from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.backends import KIND_PARAMS, adapter_block, delete_prefix


@pytest.fixture(params=KIND_PARAMS)
async def state_engine(request, tmp_path):
    block = adapter_block("state", request.param, tmp_path)
    config = make_config([{"class": "modules::state::StateModule", "config": {"adapter": block}}])
    try:
        async with open_test_engine(config) as engine:
            yield engine
    finally:
        if request.param == "redis":
            await delete_prefix(block["config"]["key_prefix"])


def ok(reply):
    assert "error" not in reply, reply
    return reply.get("result")


async def test_functions(state_engine):
    async with connect_test_worker(state_engine) as w:
        assert ok(await w.call("state::get", {"scope": "s", "key": "k"})) is None
        assert ok(await w.call("state::set", {"scope": "s", "key": "k", "value": {"n": 1}})) == {
            "old_value": None,
            "new_value": {"n": 1},
        }
        assert (
            ok(await w.call("state::set", {"scope": "s", "key": "j", "data": "alias"}))["new_value"]
            == "alias"
        )
        reply = ok(
            await w.call(
                "state::update",
                {
                    "scope": "s",
                    "key": "k",
                    "ops": [
                        {"type": "increment", "path": "n", "by": 1.5},
                        {"type": "append", "path": "l", "value": 1},
                    ],
                },
            )
        )
        assert reply == {"old_value": {"n": 1}, "new_value": {"n": 2.5, "l": [1]}}
        reply = ok(
            await w.call(
                "state::update",
                {"scope": "s", "key": "k", "ops": [{"type": "decrement", "path": "l", "by": 1}]},
            )
        )
        assert (
            reply["new_value"] == {"n": 2.5, "l": [1]}
            and reply["errors"][0]["code"] == "decrement.not_number"
        )
        assert sorted(map(str, ok(await w.call("state::list", {"scope": "s"})))) == sorted(
            map(str, [{"n": 2.5, "l": [1]}, "alias"])
        )
        ok(await w.call("state::set", {"scope": "other", "key": "x", "value": 1}))
        assert ok(await w.call("state::list_groups", {})) == {"groups": ["other", "s"]}
        assert ok(await w.call("state::delete", {"scope": "other", "key": "x"})) == 1
        assert ok(await w.call("state::delete", {"scope": "other", "key": "x"})) is None
        assert ok(await w.call("state::list_groups", {})) == {"groups": ["s"]}
        assert ok(await w.call("state::get", {"scope": "s", "key": "k"})) == {"n": 2.5, "l": [1]}


async def test_bad_input_is_refused_and_nothing_written(state_engine):
    async with connect_test_worker(state_engine) as w:
        for function_id, data in [
            ("state::set", {"scope": "s", "key": "k"}),
            ("state::set", {"scope": 1, "key": "k", "value": 1}),
            ("state::get", None),
            ("state::update", {"scope": "s", "key": "k", "ops": [{"type": "bogus"}]}),
            ("state::list_groups", None),
        ]:
            reply = await w.call(function_id, data)
            assert reply["error"]["code"] == "deserialization_error", (function_id, reply)
        assert ok(await w.call("state::list_groups", {})) == {"groups": []}


async def answer_invocations(worker, seen, results):
    """Act as the worker's SDK: record each invocation and answer it."""
    while True:
        message = await worker.receive_type("invokefunction", timeout=30)
        seen.append((message["function_id"], message["data"]))
        result = results.get(message["function_id"])
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": message["function_id"],
                "result": result(message["data"]) if callable(result) else result,
            }
        )


async def test_triggers_filter_and_condition(state_engine):
    """Exactly the matching triggers fire, each once.

    Nothing is proven by waiting for "nothing else": a trigger ``t::last``
    registered last matches every event, and one event's triggers run one
    after another in registration order, so once ``t::last`` has been called
    for an event, that event has fired everything it will.  A sentinel write
    after the three under test closes the sequence.
    """
    async with (
        connect_test_worker(state_engine) as handler,
        connect_test_worker(state_engine) as caller,
    ):
        for fid in ("t::all", "t::users", "t::cond", "t::only_vip", "t::last"):
            await handler.send({"type": "registerfunction", "id": fid})
        triggers = [
            ("t::all", {}),
            ("t::users", {"scope": "users", "key": "u1"}),
            ("t::cond", {"scope": "users", "condition_function_id": "t::only_vip"}),
            ("t::last", {}),
        ]
        for index, (fid, config) in enumerate(triggers):
            await handler.send(
                {
                    "type": "registertrigger",
                    "id": f"tr{index}",
                    "trigger_type": "state",
                    "function_id": fid,
                    "config": config,
                }
            )
        seen: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                answer_invocations,
                handler,
                seen,
                {"t::only_vip": lambda d: bool((d["new_value"] or {}).get("vip"))},
            )
            with trio.fail_after(10):
                while (
                    "t::last" not in state_engine.registry.functions
                    or len(state_engine.registry.triggers) < 4
                ):
                    await trio.sleep(0.01)
            ok(
                await caller.call(
                    "state::set", {"scope": "users", "key": "u1", "value": {"vip": True}}
                )
            )
            ok(
                await caller.call(
                    "state::set", {"scope": "users", "key": "u2", "value": {"vip": False}}
                )
            )
            ok(await caller.call("state::delete", {"scope": "users", "key": "u1"}))
            ok(await caller.call("state::set", {"scope": "sentinel", "key": "end", "value": 1}))
            with trio.fail_after(10):
                while (
                    not any(fid == "t::last" and d["scope"] == "sentinel" for fid, d in seen)
                    or sum(fid == "t::last" for fid, _ in seen) < 4
                ):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    fired = [
        (fid, d["event_type"], d["key"])
        for fid, d in seen
        if fid not in ("t::only_vip", "t::last") and d["scope"] != "sentinel"
    ]
    assert sorted(fired) == sorted(
        [
            ("t::all", "state:created", "u1"),
            ("t::all", "state:created", "u2"),
            ("t::all", "state:deleted", "u1"),
            ("t::users", "state:created", "u1"),
            ("t::users", "state:deleted", "u1"),
            ("t::cond", "state:created", "u1"),
        ]
    )
    lasts = sorted((d["event_type"], d["scope"], d["key"]) for fid, d in seen if fid == "t::last")
    assert lasts == [
        ("state:created", "sentinel", "end"),
        ("state:created", "users", "u1"),
        ("state:created", "users", "u2"),
        ("state:deleted", "users", "u1"),
    ]
    # the condition was asked for each "users" event, and only for those
    conditions = sorted((d["event_type"], d["key"]) for fid, d in seen if fid == "t::only_vip")
    assert conditions == [("state:created", "u1"), ("state:created", "u2"), ("state:deleted", "u1")]
    created = next(d for fid, d in seen if fid == "t::users" and d["event_type"] == "state:created")
    assert created == {
        "type": "state",
        "event_type": "state:created",
        "scope": "users",
        "key": "u1",
        "old_value": None,
        "new_value": {"vip": True},
    }
