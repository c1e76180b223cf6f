"""Engine semantics over in-memory sockets (spec protocol.md §3 and §9)."""

from __future__ import annotations

import math
import uuid

import attrs
import pytest
import trio
import trio.testing

from iii.engine import Engine
from iii.invocations import Invocation
from iii.testing import connect_loopback_worker, connect_test_worker, make_config, open_test_engine


async def register(worker, function_id, **extra):
    await worker.send({"type": "registerfunction", "id": function_id, **extra})


async def settle(engine, predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def answer_one(worker, *, result=None, error=None, check=None):
    request = await worker.receive_type("invokefunction")
    if check is not None:
        check(request)
    message = {
        "type": "invocationresult",
        "invocation_id": request["invocation_id"],
        "function_id": request["function_id"],
    }
    if error is not None:
        message["error"] = error
    else:
        message["result"] = result
    await worker.send(message)
    return request


async def test_workerregistered_is_the_first_frame():
    async with open_test_engine() as engine, connect_test_worker(engine, handshake=False) as worker:
        first = await worker.receive()
        assert first["type"] == "workerregistered"
        assert str(uuid.UUID(first["worker_id"])) == first["worker_id"]
        assert first["worker_id"] in engine.connections


async def test_loopback_smoke():
    async with open_test_engine() as engine, connect_loopback_worker(engine) as worker:
        assert worker.worker_id in engine.connections
        await worker.send({"type": "ping"})
        assert await worker.receive() == {"type": "pong"}


async def test_call_is_routed_with_the_same_invocation_id():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await register(owner, "demo::echo")
            await settle(engine, lambda: "demo::echo" in engine.registry.functions)
            invocation_id = str(uuid.uuid4())
            await caller.send(
                {
                    "type": "invokefunction",
                    "function_id": "demo::echo",
                    "data": {"hello": "world"},
                    "invocation_id": invocation_id,
                }
            )
            request = await owner.receive_type("invokefunction")
            assert request["invocation_id"] == invocation_id
            assert request["data"] == {"hello": "world", "_caller_worker_id": caller.worker_id}
            await owner.send(
                {
                    "type": "invocationresult",
                    "invocation_id": invocation_id,
                    "function_id": "demo::echo",
                    "result": None,
                }
            )
            result = await caller.receive_type("invocationresult")
            assert result == {
                "type": "invocationresult",
                "invocation_id": invocation_id,
                "function_id": "demo::echo",
            }


async def test_non_object_payload_is_passed_unchanged():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await register(owner, "demo::f")
            await settle(engine, lambda: "demo::f" in engine.registry.functions)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: answer_one(owner, result=[1], check=lambda r: r["data"] == [1, 2])
                )
                reply = await caller.call("demo::f", [1, 2])
            assert reply["result"] == [1]


async def test_fire_and_forget_still_runs_and_answers_nothing():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await register(owner, "demo::f")
            await settle(engine, lambda: "demo::f" in engine.registry.functions)
            await caller.send(
                {"type": "invokefunction", "function_id": "demo::f", "data": {"n": 1}}
            )
            request = await answer_one(owner, result={"ignored": True})
            uuid.UUID(request["invocation_id"])  # the engine made one up
            # void action with an id: no answer either
            await caller.send(
                {
                    "type": "invokefunction",
                    "function_id": "demo::f",
                    "data": {},
                    "invocation_id": str(uuid.uuid4()),
                    "action": {"type": "void"},
                }
            )
            await answer_one(owner, result=1)
            await caller.send({"type": "ping"})
            assert await caller.receive() == {"type": "pong"}  # nothing else arrived first


async def test_unknown_function_and_missing_data():
    async with open_test_engine() as engine, connect_test_worker(engine) as caller:
        invocation_id = str(uuid.uuid4())
        await caller.send(
            {"type": "invokefunction", "function_id": "missing::fn", "invocation_id": invocation_id}
        )
        reply = await caller.receive_type("invocationresult")
        assert reply["error"] == {
            "code": "function_not_found",
            "message": "Function missing::fn not found",
        }
        assert reply["invocation_id"] == invocation_id


async def test_worker_error_is_relayed_with_stacktrace():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await register(owner, "demo::boom")
            await settle(engine, lambda: "demo::boom" in engine.registry.functions)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: answer_one(
                        owner,
                        error={"code": "invocation_failed", "message": "boom!", "stacktrace": "tb"},
                    )
                )
                reply = await caller.call("demo::boom", {})
            assert reply["error"] == {
                "code": "invocation_failed",
                "message": "boom!",
                "stacktrace": "tb",
            }


async def test_target_disconnect_stops_the_call():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as caller:
            async with connect_test_worker(engine) as owner:
                await register(owner, "demo::slow")
                await settle(engine, lambda: "demo::slow" in engine.registry.functions)
                invocation_id = str(uuid.uuid4())
                await caller.send(
                    {
                        "type": "invokefunction",
                        "function_id": "demo::slow",
                        "data": {},
                        "invocation_id": invocation_id,
                    }
                )
                await owner.receive_type("invokefunction")
            reply = await caller.receive_type("invocationresult")
            assert reply["error"] == {"code": "invocation_stopped", "message": "Invocation stopped"}
            assert len(engine.pending) == 0
            assert "demo::slow" not in engine.registry.functions


async def test_caller_disconnect_drops_the_late_result():
    async with open_test_engine() as engine, connect_test_worker(engine) as owner:
        await register(owner, "demo::slow")
        await settle(engine, lambda: "demo::slow" in engine.registry.functions)
        async with connect_test_worker(engine) as caller:
            await caller.send(
                {
                    "type": "invokefunction",
                    "function_id": "demo::slow",
                    "data": {},
                    "invocation_id": str(uuid.uuid4()),
                }
            )
            request = await owner.receive_type("invokefunction")
        await settle(engine, lambda: len(engine.pending) == 0)
        await owner.send(
            {
                "type": "invocationresult",
                "invocation_id": request["invocation_id"],
                "function_id": "demo::slow",
                "result": 1,
            }
        )
        await owner.send({"type": "ping"})
        assert await owner.receive() == {"type": "pong"}


async def test_only_the_target_can_answer():
    async with open_test_engine() as engine:
        async with (
            connect_test_worker(engine) as owner,
            connect_test_worker(engine) as caller,
            connect_test_worker(engine) as intruder,
        ):
            await register(owner, "demo::f")
            await settle(engine, lambda: "demo::f" in engine.registry.functions)
            invocation_id = str(uuid.uuid4())
            await caller.send(
                {
                    "type": "invokefunction",
                    "function_id": "demo::f",
                    "data": {},
                    "invocation_id": invocation_id,
                }
            )
            await owner.receive_type("invokefunction")
            await intruder.send(
                {
                    "type": "invocationresult",
                    "invocation_id": invocation_id,
                    "function_id": "demo::f",
                    "result": "forged",
                }
            )
            await owner.send(
                {
                    "type": "invocationresult",
                    "invocation_id": invocation_id,
                    "function_id": "demo::f",
                    "result": "real",
                }
            )
            reply = await caller.receive_type("invocationresult")
            assert reply["result"] == "real"


async def test_engine_timeout_answers_timeout(autojump_clock):
    config = make_config(invocation_timeout_ms=200)
    async with open_test_engine(config) as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await register(owner, "demo::never")
            await settle(engine, lambda: "demo::never" in engine.registry.functions)
            reply = await caller.call("demo::never", {})
            assert reply["error"]["code"] == "timeout"
            assert len(engine.pending) == 0


async def test_malformed_messages_keep_the_connection():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        for frame in [
            "not json",
            "[1,2]",
            '{"type":"Ping"}',
            '{"type":"nope"}',
            "   ",
            b"\x00binary",
            b"OTLP{}",
        ]:
            await worker.send(frame)
        invocation_id = str(uuid.uuid4())
        await worker.send(
            {"type": "invokefunction", "invocation_id": invocation_id}
        )  # no function_id
        reply = await worker.receive_type("invocationresult")
        assert reply["invocation_id"] == invocation_id
        assert reply["error"]["code"] == "deserialization_error"
        await worker.send({"type": "ping"})
        assert await worker.receive_type("pong") == {"type": "pong"}
        assert engine.telemetry.counts["OTLP"] == 1


async def test_lenient_parsing_of_sdk_quirks():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        await worker.send({"type": "registerservice", "id": "svc"})
        await worker.send({"type": "reattach", "previous_worker_id": str(uuid.uuid4())})
        await worker.send({"type": "unregistertriggertype", "id": "nothing"})
        await worker.send(
            {"type": "registerfunction", "id": "x::y", "extra": 1, "namespace": "default"}
        )
        await settle(engine, lambda: "x::y" in engine.registry.functions)
        reply = await worker.call(
            "engine::functions::list", {}, namespace="default", metadata={"m": 1}
        )
        assert [f["function_id"] for f in reply["result"]["functions"]] == ["x::y"]


async def test_replicas_balance_and_survive_until_the_last_one():
    async with open_test_engine() as engine, connect_test_worker(engine) as caller:
        async with connect_test_worker(engine) as first:
            async with connect_test_worker(engine) as second:
                await register(first, "demo::r")
                await register(second, "demo::r")
                await settle(
                    engine,
                    lambda: (
                        len(
                            engine.registry.functions.get(
                                "demo::r",
                                attrs.make_class("E", {"replicas": attrs.field(default={})})(),
                            ).replicas
                        )
                        == 2
                    ),
                )
                # Two calls in flight: the second goes to the other (idle) replica.
                for _ in range(2):
                    await caller.send(
                        {
                            "type": "invokefunction",
                            "function_id": "demo::r",
                            "data": {},
                            "invocation_id": str(uuid.uuid4()),
                        }
                    )
                got_first = await first.receive_type("invokefunction")
                got_second = await second.receive_type("invokefunction")
                for worker, request in ((first, got_first), (second, got_second)):
                    await worker.send(
                        {
                            "type": "invocationresult",
                            "invocation_id": request["invocation_id"],
                            "function_id": "demo::r",
                            "result": 1,
                        }
                    )
                for _ in range(2):
                    assert (await caller.receive_type("invocationresult"))["result"] == 1
            # second left: the function lives on in first
            await settle(engine, lambda: len(engine.registry.functions["demo::r"].replicas) == 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: answer_one(first, result="still here"))
                assert (await caller.call("demo::r", {}))["result"] == "still here"
        await settle(engine, lambda: "demo::r" not in engine.registry.functions)


async def test_a_worker_unregisters_only_its_own_replica():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as first, connect_test_worker(engine) as second:
            await register(first, "demo::r")
            await register(second, "demo::r")
            await settle(
                engine,
                lambda: (
                    "demo::r" in engine.registry.functions
                    and len(engine.registry.functions["demo::r"].replicas) == 2
                ),
            )
            await first.send({"type": "unregisterfunction", "id": "demo::r"})
            await first.send({"type": "unregisterfunction", "id": "demo::r"})
            await settle(engine, lambda: len(engine.registry.functions["demo::r"].replicas) == 1)
            assert set(engine.registry.functions["demo::r"].replicas) == {second.worker_id}


async def test_worker_cannot_shadow_an_engine_function():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        await register(worker, "engine::functions::list")
        rejected = await worker.receive_type("registrationrejected")
        assert rejected["function_id"] == "engine::functions::list"
        assert set(engine.registry.functions["engine::functions::list"].replicas) == {None}


async def test_worker_provided_trigger_type_flow():
    async with open_test_engine() as engine, connect_test_worker(engine) as registrant:
        trigger = {
            "type": "registertrigger",
            "id": "t-1",
            "trigger_type": "webhook",
            "function_id": "demo::f",
            "config": {"a": 1},
        }
        await registrant.send(trigger)  # parked: nobody provides "webhook" yet
        await settle(engine, lambda: len(engine.registry.triggers) == 1)
        async with connect_test_worker(engine) as provider:
            await provider.send(
                {"type": "registertriggertype", "id": "webhook", "description": "Webhook"}
            )
            forwarded = await provider.receive_type("registertrigger")
            assert {k: forwarded[k] for k in ("id", "trigger_type", "function_id", "config")} == {
                "id": "t-1",
                "trigger_type": "webhook",
                "function_id": "demo::f",
                "config": {"a": 1},
            }
        # provider gone: binding kept and replayed exactly once to the next provider
        async with connect_test_worker(engine) as provider:
            await provider.send(
                {"type": "registertriggertype", "id": "webhook", "description": "Webhook"}
            )
            assert (await provider.receive_type("registertrigger"))["id"] == "t-1"
            await registrant.send({"type": "unregistertrigger", "id": "t-1"})
            assert await provider.receive_type("unregistertrigger") == {
                "type": "unregistertrigger",
                "id": "t-1",
                "trigger_type": "webhook",
            }
            await provider.send({"type": "ping"})
            assert (await provider.receive_type("pong")) == {"type": "pong"}
            assert not provider.backlog


async def test_identical_triggers_from_replicas_are_one():
    async with open_test_engine() as engine, connect_test_worker(engine) as provider:
        await provider.send({"type": "registertriggertype", "id": "tick", "description": ""})
        await settle(engine, lambda: "tick" in engine.registry.trigger_types)
        async with connect_test_worker(engine) as first:
            async with connect_test_worker(engine) as second:
                for worker, trigger_id in ((first, "a"), (second, "b")):
                    await worker.send(
                        {
                            "type": "registertrigger",
                            "id": trigger_id,
                            "trigger_type": "tick",
                            "function_id": "f",
                            "config": {"every": 1},
                        }
                    )
                assert (await provider.receive_type("registertrigger"))["id"] == "a"
                await settle(engine, lambda: len(engine.registry.registrations) == 2)
            # second left; first still holds it: no unregister yet
            await settle(engine, lambda: len(engine.registry.registrations) == 1)
            await provider.send({"type": "ping"})
            await provider.receive_type("pong")
            assert not provider.backlog
        assert (await provider.receive_type("unregistertrigger"))["id"] == "a"
        assert len(engine.registry.triggers) == 0


async def test_replayed_registrations_are_idempotent():
    async with open_test_engine() as engine, connect_test_worker(engine) as provider:
        await provider.send({"type": "registertriggertype", "id": "tick", "description": ""})
        async with connect_test_worker(engine) as worker:
            for _ in range(3):
                await register(worker, "demo::f")
                await worker.send(
                    {
                        "type": "registertrigger",
                        "id": "t",
                        "trigger_type": "tick",
                        "function_id": "demo::f",
                        "config": None,
                    }
                )
            await settle(engine, lambda: len(engine.registry.registrations) == 1)
            await provider.receive_type("registertrigger")
            await provider.send({"type": "ping"})
            await provider.receive_type("pong")
            assert not provider.backlog
            assert len(engine.registry.functions["demo::f"].replicas) == 1


async def test_reattach_with_token_drops_the_old_connection():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine, handshake=False) as old:
            hello = await old.receive()
            await register(old, "demo::f")
            await settle(engine, lambda: "demo::f" in engine.registry.functions)
            async with connect_test_worker(engine) as new:
                await new.send(
                    {
                        "type": "reattach",
                        "previous_worker_id": hello["worker_id"],
                        "reattach_token": "wrong",
                    }
                )
                await new.send({"type": "ping"})
                await new.receive_type("pong")
                assert hello["worker_id"] in engine.connections
                await new.send(
                    {
                        "type": "reattach",
                        "previous_worker_id": hello["worker_id"],
                        "reattach_token": hello["reattach_token"],
                    }
                )
                await settle(engine, lambda: hello["worker_id"] not in engine.connections)
                assert "demo::f" not in engine.registry.functions


async def test_heartbeat_drops_a_silent_worker(autojump_clock):
    config = make_config(heartbeat_interval_ms=50, heartbeat_timeout_ms=200)
    async with open_test_engine(config) as engine, connect_test_worker(engine) as caller:
        async with connect_test_worker(engine) as silent:
            await register(silent, "silent::f")
            await settle(engine, lambda: "silent::f" in engine.registry.functions)
            # The client library answers pings from its reader task, which stalls
            # once its one-message queue is full and nobody reads: a half-dead peer.
            for _ in range(3):
                await caller.send(
                    {"type": "invokefunction", "function_id": "silent::f", "data": {}}
                )
            await settle(engine, lambda: silent.worker_id not in engine.connections)
            assert "silent::f" not in engine.registry.functions


async def test_engine_functions_list_hides_internal_and_foreign_formats():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        tree = {
            "name": "input",
            "type": "object",
            "body": [{"name": "a", "type": "number", "required": True}],
        }
        await register(worker, "a::tree", request_format=tree, metadata={"k": "v"})
        await register(
            worker,
            "a::schema",
            request_format={"type": "object", "properties": {}},
            metadata=["not", "a", "dict"],
        )
        await settle(engine, lambda: "a::schema" in engine.registry.functions)
        listed = {
            f["function_id"]: f
            for f in (await worker.call("engine::functions::list", {}))["result"]["functions"]
        }
        assert set(listed) == {"a::tree", "a::schema"}
        assert listed["a::tree"]["request_format"] == tree and listed["a::tree"]["metadata"] == {
            "k": "v"
        }
        assert (
            listed["a::schema"]["request_format"] is None
            and listed["a::schema"]["metadata"] is None
        )
        everything = (await worker.call("engine::functions::list", {"include_internal": True}))[
            "result"
        ]["functions"]
        assert "engine::workers::list" in {f["function_id"] for f in everything}


async def test_workers_register_and_list():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        await register(worker, "w::f")
        reply = await worker.call(
            "engine::workers::register",
            {
                "runtime": "python",
                "version": "0.4.1",
                "name": "demo",
                "os": "Linux",
                "telemetry": {"language": "C"},
            },
        )
        assert reply["result"] == {"success": True}
        listed = (await worker.call("engine::workers::list", {"worker_id": worker.worker_id}))[
            "result"
        ]
        assert len(listed["workers"]) == 1
        info = listed["workers"][0]
        assert (info["name"], info["runtime"], info["version"], info["os"]) == (
            "demo",
            "python",
            "0.4.1",
            "Linux",
        )
        assert (
            info["functions"] == ["w::f"]
            and info["function_count"] == 1
            and info["status"] == "connected"
        )


async def test_workers_available_trigger_fires():
    async with open_test_engine() as engine, connect_test_worker(engine) as watcher:
        await register(watcher, "watch::workers")
        await watcher.send(
            {
                "type": "registertrigger",
                "id": "w",
                "trigger_type": "engine::workers-available",
                "function_id": "watch::workers",
                "config": {},
            }
        )
        await settle(engine, lambda: len(engine.registry.triggers) == 1)
        async with connect_test_worker(engine) as newcomer:
            request = await answer_one(watcher, result=None)
            assert request["data"] == {"event": "worker_connected", "worker_id": newcomer.worker_id}
        request = await answer_one(watcher, result=None)
        assert request["data"] == {"event": "worker_disconnected", "worker_id": newcomer.worker_id}


async def test_functions_available_trigger_fires_once_per_burst():
    async with open_test_engine() as engine, connect_test_worker(engine) as watcher:
        await register(watcher, "watch::functions")
        await watcher.send(
            {
                "type": "registertrigger",
                "id": "f",
                "trigger_type": "engine::functions-available",
                "function_id": "watch::functions",
                "config": {},
            }
        )
        await settle(engine, lambda: len(engine.registry.triggers) == 1)
        for i in range(5):
            await register(watcher, f"burst::{i}")
        request = await answer_one(watcher, result=None)
        assert request["data"]["event"] == "functions_changed"
        ids = {f["function_id"] for f in request["data"]["functions"]}
        assert {f"burst::{i}" for i in range(5)} <= ids


@pytest.mark.parametrize("limit_known", [False, True])
async def test_frames_to_legacy_workers_are_capped(limit_known):
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await register(owner, "big::f")
            if limit_known:
                await owner.call(
                    "engine::workers::register",
                    {"runtime": "python", "version": "0.25.0", "features": ["large-messages.v1"]},
                )
            await settle(engine, lambda: "big::f" in engine.registry.functions)
            payload = {"blob": "x" * (2 * 1024 * 1024)}
            if limit_known:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: answer_one(owner, result="ok"))
                    assert (await caller.call("big::f", payload))["result"] == "ok"
            else:
                reply = await caller.call("big::f", payload)
                assert reply["error"]["code"] == "payload_too_large"


async def test_channels_relay_frames_in_order_and_refuse_bad_keys():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        refs = (await worker.call("engine::channels::create", {"buffer_size": 4}))["result"]
        writer, reader = refs["writer"], refs["reader"]
        assert writer["channel_id"] == reader["channel_id"] and writer["direction"] == "write"
        base = f"/ws/channels/{writer['channel_id']}"
        async with connect_test_worker(
            engine, f"{base}?key={writer['access_key']}&dir=write", handshake=False
        ) as w:
            for frame in ["text-1", b"bin-1", "text-2", b"bin-2"]:
                await w.ws.send_message(frame)
        # The writer closed before the reader came: frames and end-of-stream were kept.
        async with connect_test_worker(
            engine, f"{base}?key={reader['access_key']}&dir=read", handshake=False
        ) as r:
            got = [await r.ws.get_message() for _ in range(4)]
            assert got == ["text-1", b"bin-1", "text-2", b"bin-2"]
            from trio_websocket import ConnectionClosed

            with pytest.raises(ConnectionClosed):
                await r.ws.get_message()
        from trio_websocket import ConnectionRejected

        with pytest.RaisesGroup(
            pytest.RaisesExc(ConnectionRejected, check=lambda e: e.status_code == 404),
            flatten_subgroups=True,
        ):
            async with connect_test_worker(engine, f"{base}?key=wrong&dir=read", handshake=False):
                pass


async def test_otel_socket_feeds_the_sink():
    async with (
        open_test_engine() as engine,
        connect_test_worker(engine, "/otel", handshake=False) as telemetry,
    ):
        await telemetry.ws.send_message(b"LOGS{}")
        await telemetry.ws.send_message(b"MTRC{}")
        await settle(
            engine,
            lambda: engine.telemetry.counts["LOGS"] == 1 and engine.telemetry.counts["MTRC"] == 1,
        )
        assert engine.registry.workers == {}


async def test_graceful_shutdown_closes_workers_with_a_reconnect_code():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        engine.request_shutdown()
        from trio_websocket import ConnectionClosed

        with trio.fail_after(5):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await worker.ws.get_message()
        assert closed.value.reason.code == 1012


async def test_shutdown_lets_in_flight_calls_finish_within_the_grace():
    config = make_config(shutdown_grace_ms=5000)
    async with open_test_engine(config) as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            await register(owner, "demo::slow")
            await settle(engine, lambda: "demo::slow" in engine.registry.functions)
            invocation_id = str(uuid.uuid4())
            await caller.send(
                {
                    "type": "invokefunction",
                    "function_id": "demo::slow",
                    "data": {},
                    "invocation_id": invocation_id,
                }
            )
            request = await owner.receive_type("invokefunction")
            engine.request_shutdown()
            with trio.fail_after(10):
                await engine.shutting_down.wait()
            # Intake is closed, but the call in flight may still finish.
            await owner.send(
                {
                    "type": "invocationresult",
                    "invocation_id": request["invocation_id"],
                    "function_id": "demo::slow",
                    "result": "done",
                }
            )
            reply = await caller.receive_type("invocationresult")
            assert reply["result"] == "done"


async def test_a_crashing_module_stops_the_engine(monkeypatch):
    import iii.modules as modules_registry
    from iii.serve import serve_engine
    from tests.crashing_module import ModuleCrashed

    spec = modules_registry.ModuleSpec("test::CrashingModule", "crashing", "tests.crashing_module")
    monkeypatch.setitem(modules_registry.MODULE_SPECS, spec.class_name, spec)
    config = make_config(modules=[{"class": spec.class_name}])
    with pytest.RaisesGroup(ModuleCrashed, flatten_subgroups=True):
        with trio.fail_after(5):
            await serve_engine(config, handle_signals=False)


async def test_removing_a_channel_ends_its_sockets():
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        refs = (await worker.call("engine::channels::create", {}))["result"]
        reader = refs["reader"]
        path = f"/ws/channels/{reader['channel_id']}?key={reader['access_key']}&dir=read"
        async with connect_test_worker(engine, path, handshake=False) as socket_side:
            await settle(
                engine, lambda: engine.channels.channels[reader["channel_id"]].socket_scopes
            )
            engine.channels.remove(engine.channels.channels[reader["channel_id"]])
            from trio_websocket import ConnectionClosed

            with trio.fail_after(5), pytest.raises(ConnectionClosed):
                await socket_side.ws.get_message()


async def test_a_short_deadline_filed_after_a_long_one_still_times_out_on_time(autojump_clock):
    """The expiry task sleeps until the earliest deadline; a later, shorter
    call must move that wake-up earlier."""
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as owner:
            await register(owner, "demo::never")
            await settle(engine, lambda: "demo::never" in engine.registry.functions)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_expect_timeout, engine, 60.0)  # long: still pending at the end
                await settle(engine, lambda: len(engine.pending) == 1)
                started = trio.current_time()
                await _expect_timeout(engine, 0.2)
                waited = trio.current_time() - started
                # Virtual time: it wakes at the short deadline, or at 60 s.
                assert 0.2 <= waited < 1.0, waited
                assert len(engine.pending) == 1
                nursery.cancel_scope.cancel()
            assert len(engine.pending) == 0


async def _expect_timeout(engine, timeout):
    from iii.errors import InvocationTimeoutError

    with pytest.raises(InvocationTimeoutError):
        await engine.invoke("demo::never", {}, timeout=timeout)


async def test_shutdown_waits_for_tracked_calls_and_pending_ones_without_polling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = Engine(make_config([]))
    release = trio.Event()
    idle_at: list[float] = []

    async def tracked_call() -> None:
        with engine.track_call():
            await release.wait()

    async def drain() -> None:
        await engine.wait_idle()
        idle_at.append(trio.current_time())

    invocation = Invocation(
        invocation_id="i",
        function_id="f",
        target_worker_id="w",
        caller_worker_id=None,
        deadline=math.inf,
    )
    engine.pending.add(invocation)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracked_call)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(drain)
        await trio.sleep(7.3)
        release.set()  # the tracked call ends; one call is still pending
        await trio.testing.wait_all_tasks_blocked()
        assert idle_at == [] and engine.inflight == 0
        await trio.sleep(1.1)
        engine.pending.discard(invocation)
    assert idle_at == [pytest.approx(8.4)]  # at once, not at a poll tick


def test_hooks_are_undone_when_their_block_ends_even_by_an_error() -> None:
    from iii.tracing import NOOP_TRACER

    engine = Engine(make_config([]))
    tracer = object()
    events: list[tuple[str, str]] = []

    def on_worker(event: str, worker_id: str) -> None:
        events.append((event, worker_id))

    def sensitive(function_id: str) -> bool:
        return function_id == "secret"

    with pytest.raises(RuntimeError):
        with (
            engine.using_tracer(tracer),  # type: ignore[arg-type]
            engine.listening(workers=on_worker),
            engine.marking_sensitive(sensitive),
            engine.using_external_function_factory(lambda *_: None),  # type: ignore[arg-type]
        ):
            assert engine.tracer is tracer and engine.is_sensitive("secret")
            engine.notify_worker("worker_connected", "w1")
            raise RuntimeError("the module failed")
    assert engine.tracer is NOOP_TRACER
    assert engine.worker_listeners == [] and engine.sensitive_functions == []
    assert engine.external_function_factory is None
    assert events == [("worker_connected", "w1")]


async def test_the_observability_module_undoes_its_hooks_when_it_stops() -> None:
    import logging

    from iii.tracing import NOOP_TRACER

    handlers_before = list(logging.getLogger("iii").handlers)
    otel = {"enabled": True, "exporter": "memory"}
    config = make_config([{"class": "modules::observability::OtelModule", "config": otel}])
    async with open_test_engine(config) as engine:
        assert engine.tracer is not NOOP_TRACER and engine.telemetry.consumer is not None
        assert len(logging.getLogger("iii").handlers) == len(handlers_before) + 1
    assert engine.tracer is NOOP_TRACER and engine.telemetry.consumer is None
    assert logging.getLogger("iii").handlers == handlers_before
    assert engine.worker_listeners == []
