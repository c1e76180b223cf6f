"""Bridge adapters for State and Stream: three engines on loopback
(:mod:`tests.adapters.bridge_support`).

A backend process runs State and Stream on KvStore; a bridge engine runs them
on the Bridge adapters; a second bridge engine on the same backend (the
"test" engine) sees the first one's stream events through the backend's
``stream.events`` topic.  Official SDK workers (Python 0.25 and 0.4.1, Node)
sit on the bridge engine.  Also: the outage and recovery of the backend, the
seed-era ``kv_server`` remote, a hostile or failing remote, config errors and
a restricted backend token.
"""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from iii.config import parse_config
from iii.errors import ConfigError
from iii.testing import RawWorker, connect_test_worker, open_test_engine
from tests.adapters.bridge_support import (
    answer_jobs,
    backend_config,
    backend_process,
    bridge_config,
    called,
    connected,
    ok,
    raw_worker_at,
    until_ok,
    wait_for,
)
from tests.modules.test_stream import client_of, event_of
from tests.sdk_workers import SCRIPTS, command
from tests.support import EngineProcess, free_port, start_node_worker, start_sdk_worker

# -- state and stream, with SDK workers --------------------------------------------------

NODE_WORKER = r"""
import { registerWorker } from 'iii-sdk'
import readline from 'node:readline'

const iii = registerWorker(process.argv[2], { workerName: 'node-bridge' })
console.log('READY')
const lines = readline.createInterface({ input: process.stdin })
for await (const line of lines) {
  const cmd = JSON.parse(line)
  try {
    let out = null
    if (cmd.op === 'call') out = await iii.trigger({ function_id: cmd.fn, payload: cmd.data })
    if (cmd.op === 'register') iii.registerFunction(cmd.id, async (input) => {
      console.log('CALLED ' + cmd.id + ' ' + JSON.stringify(input))
      return null
    })
    if (cmd.op === 'trigger') iii.registerTrigger({ type: cmd.type, function_id: cmd.fn, config: cmd.config })
    console.log('OK ' + JSON.stringify(out))
  } catch (e) {
    console.log('ERR ' + JSON.stringify({ code: e.code ?? null, message: String(e.message ?? e) }))
  }
}
process.exit(0)
"""


@asynccontextmanager
async def sdk_worker(kind: str, url: str):
    if kind == "node":
        async with start_node_worker(NODE_WORKER, url=url) as worker:
            await worker.wait_for("READY", timeout=120)
            yield worker
    else:
        async with start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=url) as worker:
            await worker.wait_for("READY", timeout=60)
            yield worker


@pytest.mark.sdk
@pytest.mark.parametrize("kind", ["python-0.25", "node"])
async def test_state_and_stream_through_the_bridge(tmp_path, kind):
    async with backend_process(tmp_path) as backend, AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False))
        )
        other = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False))
        )
        await wait_for(lambda: connected(bridge, "state", "stream") and connected(other, "stream"))
        on_backend = await stack.enter_async_context(raw_worker_at(backend.port))
        worker = await stack.enter_async_context(
            sdk_worker(kind, f"ws://127.0.0.1:{bridge.listen_port}")
        )
        client_here = await stack.enter_async_context(client_of(bridge))
        client_there = await stack.enter_async_context(client_of(other))

        for fn in ("t::on_state", "t::on_stream"):
            assert (await command(worker, op="register", id=fn))[0] == "OK"
        await command(
            worker, op="trigger", type="state", fn="t::on_state", config={"scope": "users"}
        )
        await command(
            worker, op="trigger", type="stream", fn="t::on_stream", config={"stream_name": "chat"}
        )
        await wait_for(lambda: len(bridge.registry.triggers) == 2)
        for client in (client_here, client_there):
            await client.join("s1", "chat", "room")
            assert (await client.receive())["event"] == {"type": "sync", "data": []}

        # state::set / get / list from the SDK; the data is on the backend
        status, value = await command(
            worker,
            op="call",
            fn="state::set",
            data={"scope": "users", "key": "u1", "value": {"name": "ada"}},
        )
        assert (status, value) == ("OK", {"old_value": None, "new_value": {"name": "ada"}})
        assert ok(await on_backend.call("state::get", {"scope": "users", "key": "u1"})) == {
            "name": "ada"
        }
        ok(
            await on_backend.call(
                "state::set", {"scope": "users", "key": "u2", "value": {"name": "bob"}}
            )
        )
        assert await command(
            worker, op="call", fn="state::get", data={"scope": "users", "key": "u2"}
        ) == ("OK", {"name": "bob"})
        status, values = await command(worker, op="call", fn="state::list", data={"scope": "users"})
        assert status == "OK" and sorted(v["name"] for v in values) == ["ada", "bob"]
        event = called(await worker.wait_for("CALLED t::on_state", timeout=20))
        assert event == {
            "type": "state",
            "event_type": "state:created",
            "scope": "users",
            "key": "u1",
            "old_value": None,
            "new_value": {"name": "ada"},
        }

        # stream::set / get from the SDK; the trigger fires, both engines' clients get the event
        item = {"stream_name": "chat", "group_id": "room", "item_id": "m1"}
        status, value = await command(
            worker, op="call", fn="stream::set", data={**item, "data": {"text": "hi"}}
        )
        assert (status, value) == ("OK", {"old_value": None, "new_value": {"text": "hi"}})
        assert ok(await on_backend.call("stream::get", item)) == {"text": "hi"}
        assert await command(worker, op="call", fn="stream::get", data=item) == (
            "OK",
            {"text": "hi"},
        )
        created = ("chat", "room", "m1", {"type": "create", "data": {"text": "hi"}})
        assert event_of(await client_here.receive()) == created
        assert event_of(await client_there.receive()) == created
        message = called(await worker.wait_for("CALLED t::on_stream", timeout=20))
        assert event_of(message) == created
        # the bridge engine does not hear its own event back from the backend
        ok(await on_backend.call("stream::set", {**item, "item_id": "m2", "data": 2}))
        status, _ = await command(
            worker, op="call", fn="stream::set", data={**item, "item_id": "m3", "data": 3}
        )
        assert status == "OK"
        assert event_of(await client_here.receive())[2] == "m3"


async def test_stream_events_reach_the_other_engine_and_the_backend_list(tmp_path):
    async with backend_process(tmp_path) as backend, AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False))
        )
        other = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False))
        )
        await wait_for(lambda: connected(bridge, "state", "stream") and connected(other, "stream"))
        caller = await stack.enter_async_context(connect_test_worker(bridge))
        client = await stack.enter_async_context(client_of(other))
        own_client = await stack.enter_async_context(client_of(bridge))
        for each in (client, own_client):
            await each.join("s", "chat", "room")
            assert (await each.receive())["event"] == {"type": "sync", "data": []}
        # a stream trigger on the other engine fires for this engine's writes too
        watcher = await stack.enter_async_context(connect_test_worker(other))
        await watcher.send({"type": "registerfunction", "id": "w::chat"})
        await watcher.send(
            {
                "type": "registertrigger",
                "id": "tw",
                "trigger_type": "stream",
                "function_id": "w::chat",
                "config": {"stream_name": "chat"},
            }
        )
        await wait_for(lambda: len(other.registry.triggers) == 1)
        seen: list[Any] = []
        answering = await stack.enter_async_context(trio.open_nursery())
        answering.start_soon(answer_jobs, watcher, seen)
        item = {"stream_name": "chat", "group_id": "room", "item_id": "m1"}
        ok(await caller.call("stream::set", {**item, "data": 1}))
        await wait_for(lambda: len(seen) == 1)
        assert event_of(seen[0]) == ("chat", "room", "m1", {"type": "create", "data": 1})
        ok(
            await caller.call(
                "stream::update", {**item, "ops": [{"type": "set", "path": "", "value": 5}]}
            )
        )
        assert ok(await caller.call("stream::delete", item)) == {"old_value": 5}
        ok(
            await caller.call(
                "stream::send",
                {"stream_name": "chat", "group_id": "room", "type": "typing", "data": {"who": "x"}},
            )
        )
        kinds = [event_of(await client.receive())[3]["type"] for _ in range(4)]
        assert kinds == ["create", "update", "delete", "event"]
        # this engine's own client gets each message once: the echo from the backend is
        # dropped (a message published on the backend after them arrives next)
        assert [event_of(await own_client.receive())[3]["type"] for _ in range(4)] == kinds
        async with raw_worker_at(backend.port) as on_backend:
            sentinel = {
                "type": "stream",
                "timestamp": 1,
                "streamName": "chat",
                "groupId": "room",
                "id": "end",
                "event": {"type": "event", "event": {"type": "end", "data": None}},
            }
            ok(await on_backend.call("publish", {"topic": "stream.events", "data": sentinel}))
        assert await own_client.receive() == sentinel
        ok(await caller.call("stream::set", {**item, "group_id": "b", "data": 1}))
        assert ok(await caller.call("stream::list_groups", {"stream_name": "chat"})) == ["b"]
        assert ok(await caller.call("stream::list", {"stream_name": "chat", "group_id": "b"})) == [
            1
        ]
        ok(await caller.call("state::set", {"scope": "s", "key": "k", "value": 1}))
        assert ok(
            await caller.call(
                "state::update",
                {"scope": "s", "key": "k", "ops": [{"type": "increment", "path": "", "by": 2}]},
            )
        ) == {"old_value": 1, "new_value": 3}
        assert ok(await caller.call("state::list_groups", {})) == {"groups": ["s"]}
        assert ok(await caller.call("state::delete", {"scope": "s", "key": "k"})) == 3
        answering.cancel_scope.cancel()


# -- outage and recovery ----------------------------------------------------------------


async def test_adapter_unavailable_at_once_while_the_backend_is_down(tmp_path):
    port = free_port()
    (tmp_path / "queue").mkdir()
    backend = EngineProcess.write(tmp_path, backend_config(tmp_path / "queue", port))
    backend.start()
    try:
        await backend.started()
        async with (
            open_test_engine(bridge_config(backend.url)) as bridge,
            connect_test_worker(bridge) as caller,
        ):
            await wait_for(lambda: connected(bridge, "state", "stream", "queue"))
            ok(await caller.call("state::set", {"scope": "s", "key": "k", "value": 1}))

            backend.kill()
            await wait_for(lambda: not bridge.modules["state"].adapter.link.connected)
            # far less than any call timeout: the link is down, the answer comes at once
            with trio.fail_after(5):
                for function_id, data in [
                    ("state::get", {"scope": "s", "key": "k"}),
                    ("state::set", {"scope": "s", "key": "k", "value": 2}),
                    ("stream::get", {"stream_name": "a", "group_id": "b", "item_id": "c"}),
                ]:
                    reply = await caller.call(function_id, data, timeout=60)
                    assert reply["error"]["code"] == "adapter_unavailable", reply
                # the queue module answers its own code for a backend it cannot reach
                reply = await caller.call("enqueue", {"topic": "t", "data": 1}, timeout=60)
                assert (
                    reply["error"]["code"] == "enqueue_error"
                    and "is down" in reply["error"]["message"]
                ), reply

            backend.start()  # the same port: the links come back by themselves
            await backend.started()
            assert (
                await until_ok(caller, "state::get", {"scope": "s", "key": "k"}) is None
            )  # in-memory backend
            ok(await caller.call("state::set", {"scope": "s", "key": "k", "value": 3}))
            async with raw_worker_at(port) as on_backend:
                assert ok(await on_backend.call("state::get", {"scope": "s", "key": "k"})) == 3
    finally:
        backend.kill()


# -- the seed-era kv_server remote ----------------------------------------------------------


async def test_kv_server_remote_keeps_state_and_streams_in_kv_server_indexes(tmp_path):
    async with backend_process(tmp_path) as backend, AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False, remote="kv_server"))
        )
        await wait_for(lambda: connected(bridge, "state", "stream"))
        caller = await stack.enter_async_context(connect_test_worker(bridge))
        on_backend = await stack.enter_async_context(raw_worker_at(backend.port))

        assert ok(
            await caller.call("state::set", {"scope": "users", "key": "u1", "value": {"n": 1}})
        ) == {"old_value": None, "new_value": {"n": 1}}
        assert ok(await on_backend.call("kv_server::get", {"index": "users", "key": "u1"})) == {
            "n": 1
        }
        assert (
            ok(await on_backend.call("state::get", {"scope": "users", "key": "u1"})) is None
        )  # not the state module
        reply = ok(
            await caller.call(
                "state::update",
                {
                    "scope": "users",
                    "key": "u1",
                    "ops": [{"type": "increment", "path": "n", "by": 2}],
                },
            )
        )
        assert reply == {"old_value": {"n": 1}, "new_value": {"n": 3}}
        assert ok(await caller.call("state::list", {"scope": "users"})) == [{"n": 3}]
        assert ok(await caller.call("state::delete", {"scope": "users", "key": "u1"})) == {"n": 3}
        assert ok(await caller.call("state::get", {"scope": "users", "key": "u1"})) is None
        assert (await caller.call("state::list_groups", {}))["error"]["code"] == "not_supported"

        item = {"stream_name": "chat", "group_id": "room", "item_id": "m1"}
        assert ok(await caller.call("stream::set", {**item, "data": "hi"})) == {
            "old_value": None,
            "new_value": "hi",
        }
        assert (
            ok(await on_backend.call("kv_server::get", {"index": "chat::room", "key": "m1"}))
            == "hi"
        )
        assert ok(await caller.call("stream::get", item)) == "hi"
        assert ok(
            await caller.call("stream::list", {"stream_name": "chat", "group_id": "room"})
        ) == ["hi"]
        assert ok(await caller.call("stream::delete", item)) == {"old_value": "hi"}
        assert (await caller.call("stream::list_all", {}))["error"]["code"] == "not_supported"


# -- a hostile or failing remote --------------------------------------------------------------


async def serve_hooks(worker: RawWorker, answers: dict[str, dict[str, Any]]) -> None:
    """Answer the backend's calls of ``worker``'s functions with ``answers[function_id]``."""
    while True:
        message = await worker.receive_type("invokefunction", timeout=120)
        body = answers[message["function_id"]]
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": message["function_id"],
                **body,
            }
        )


async def test_remote_errors_keep_their_code_and_bad_answers_are_refused(tmp_path):
    async with backend_process(tmp_path) as backend, AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False))
        )
        await wait_for(lambda: connected(bridge, "state", "stream"))
        caller = await stack.enter_async_context(connect_test_worker(bridge))
        hooks = await stack.enter_async_context(raw_worker_at(backend.port))
        answers = {
            "stream::get(evil)": {"error": {"code": "E_HOOK", "message": "no"}},
            "stream::list(evil)": {"result": "not a list"},
            "stream::set(odd)": {"result": {"old_value": None, "new_value": 1}},
            "stream::list_groups(evil)": {"result": [1, 2]},
        }
        for function_id in answers:
            await hooks.send({"type": "registerfunction", "id": function_id})
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(serve_hooks, hooks, answers)
        item = {"stream_name": "evil", "group_id": "g", "item_id": "i"}
        # the registrations are in place once a call through them answers
        with trio.fail_after(20):
            while (await caller.call("stream::get", item)).get("error", {}).get("code") != "E_HOOK":
                await trio.sleep(0.05)
        assert (await caller.call("stream::list", {"stream_name": "evil", "group_id": "g"}))[
            "error"
        ]["code"] == "bad_remote_answer"
        assert (await caller.call("stream::list_groups", {"stream_name": "evil"}))["error"][
            "code"
        ] == "bad_remote_answer"
        # a hook answering a set (the remote's override) is an answer like any other
        assert ok(await caller.call("stream::set", {**item, "stream_name": "odd", "data": 1})) == {
            "old_value": None,
            "new_value": 1,
        }
        # a raw worker has 1 MiB frames: the bridge reads the old value first, and the
        # remote's error on that read is the answer (nothing was written)
        assert (await caller.call("stream::set", {**item, "data": 1}))["error"]["code"] == "E_HOOK"
        nursery.cancel_scope.cancel()


async def test_stream_events_from_the_remote_are_checked(tmp_path, caplog):
    async with backend_process(tmp_path) as backend, AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False))
        )
        await wait_for(lambda: connected(bridge, "stream"))
        client = await stack.enter_async_context(client_of(bridge))
        await client.join("s", "chat", "room")
        assert (await client.receive())["event"] == {"type": "sync", "data": []}
        publisher = await stack.enter_async_context(raw_worker_at(backend.port))
        for bad in ("garbage", {"streamName": "chat"}, {"__iii_origin": 5}):
            ok(await publisher.call("publish", {"topic": "stream.events", "data": bad}))
        await wait_for(
            lambda: (
                sum("ignoring a malformed message" in r.getMessage() for r in caplog.records) == 3
            )
        )
        # a well-formed message from another engine (an upstream one carries no origin)
        message = {
            "type": "stream",
            "timestamp": 1,
            "streamName": "chat",
            "groupId": "room",
            "id": "x",
            "event": {"type": "create", "data": 7},
        }
        ok(await publisher.call("publish", {"topic": "stream.events", "data": message}))
        assert await client.receive() == message


@pytest.mark.parametrize(
    "config, key",
    [
        ({"bridge_url": "http://x"}, "bridge_url"),
        ({"bridge_url": 5}, "bridge_url"),
        ({"remote": "redis"}, "remote"),
        ({"call_timeout_ms": 0}, "call_timeout_ms"),
        ({"token": ["a"]}, "token"),
        ({"token": "has space"}, "token"),
    ],
)
def test_a_bad_bridge_key_is_a_config_error_naming_it(config, key):
    # Checked when the config is loaded (check-config catches it), with the full key path.
    modules = {
        "modules::state::StateModule": "modules::state::adapters::Bridge",
        "modules::stream::StreamModule": "modules::stream::adapters::Bridge",
    }
    if key != "remote":
        modules["modules::queue::QueueModule"] = "modules::queue::adapters::Bridge"
    for module, adapter in modules.items():
        entry = {"class": module, "config": {"adapter": {"class": adapter, "config": config}}}
        with pytest.raises(ConfigError) as info:
            parse_config({"modules": [entry]}, file="c.yaml")
        assert (info.value.file, info.value.key) == (
            "c.yaml",
            f"modules[0].config.adapter.config.{key}",
        )


async def test_an_unreachable_remote_does_not_stop_the_engine():
    port = free_port()  # nothing listens there
    async with (
        open_test_engine(bridge_config(f"ws://127.0.0.1:{port}")) as bridge,
        connect_test_worker(bridge) as caller,
    ):
        assert not bridge.modules["state"].adapter.link.connected
        assert (await caller.call("state::get", {"scope": "s", "key": "k"}))["error"][
            "code"
        ] == "adapter_unavailable"
        assert (await caller.call("engine::queue::list_topics", {}))["error"][
            "code"
        ] == "adapter_unavailable"


@pytest.mark.sdk
async def test_sdk_041_worker_on_the_bridge_engine(tmp_path):
    """A 0.4.1 worker (1 MiB frames): its set lands on the backend, and a write whose
    answer would not fit its frames is refused before anything is sent."""
    async with backend_process(tmp_path) as backend, AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(
            open_test_engine(bridge_config(backend.url, queue=False))
        )
        await wait_for(lambda: connected(bridge, "state", "stream"))
        on_backend = await stack.enter_async_context(raw_worker_at(backend.port))
        worker = await stack.enter_async_context(
            start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=f"ws://127.0.0.1:{bridge.listen_port}")
        )
        await worker.wait_for("READY", timeout=60)

        status, value = await command(
            worker, op="call", fn="state::set", data={"scope": "s", "key": "k", "value": {"v": 1}}
        )
        assert (status, value) == ("OK", {"old_value": None, "new_value": {"v": 1}})
        assert ok(await on_backend.call("state::get", {"scope": "s", "key": "k"})) == {"v": 1}

        big = "x" * 700_000
        for fn, data in [
            ("state::set", {"scope": "s", "key": "big", "value": big}),
            ("stream::set", {"stream_name": "a", "group_id": "b", "item_id": "c", "data": big}),
        ]:
            status, value = await command(worker, op="call", fn=fn, data=data)
            assert (status, value) == ("OK", {"old_value": None, "new_value": big}) or (
                status,
                value["new_value"],
            ) == ("OK", big)
            status, error = await command(
                worker,
                op="call",
                fn=fn,
                data={**data, ("value" if fn == "state::set" else "data"): big + "y"},
            )
            assert (status, error["code"]) == ("ERR", "payload_too_large"), error
        assert (
            ok(await on_backend.call("state::get", {"scope": "s", "key": "big"})) == big
        )  # unchanged
        assert (
            ok(
                await on_backend.call(
                    "stream::get", {"stream_name": "a", "group_id": "b", "item_id": "c"}
                )
            )
            == big
        )


# -- auth: the grant a Bridge needs on the backend ---------------------------------------------

BRIDGE_GRANT = {
    "name": "bridge",
    "env": "III_TEST_BRIDGE_TOKEN",
    "register": ["stream::bridge::on_pub::*", "queue::bridge::on_message::*"],
    "invoke": [
        "state::*",
        "stream::*",
        "publish",
        "enqueue",
        "engine::queue::*",
        "iii::queue::*",
        "stream::bridge::on_pub::*",
        "queue::bridge::on_message::*",
    ],
    "trigger_types": ["subscribe(stream.events)", "queue(*)"],
}


async def test_bridge_with_a_restricted_token(tmp_path, monkeypatch):
    secret = "bridge-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("III_TEST_BRIDGE_TOKEN", secret)
    (tmp_path / "queue").mkdir()
    config = backend_config(tmp_path / "queue")
    config["auth"] = {"tokens": [BRIDGE_GRANT, {"name": "admin", "env": "III_TEST_ADMIN_TOKEN"}]}
    monkeypatch.setenv("III_TEST_ADMIN_TOKEN", "admin-secret-" + uuid.uuid4().hex)
    backend = EngineProcess.write(tmp_path, config)
    backend.start()
    try:
        await backend.started()
        async with AsyncExitStack() as stack:
            wrong = await stack.enter_async_context(
                open_test_engine(
                    bridge_config(backend.url, queue=False, token="not-the-token-at-all")
                )
            )
            bridge = await stack.enter_async_context(
                open_test_engine(bridge_config(backend.url, token=secret))
            )
            other = await stack.enter_async_context(
                open_test_engine(bridge_config(backend.url, queue=False, token=secret))
            )
            await wait_for(
                lambda: connected(bridge, "state", "stream", "queue") and connected(other, "stream")
            )
            refused_link = wrong.modules["state"].adapter.link
            assert not refused_link.connected and refused_link.statistics().failed_attempts >= 1
            assert "401" in (refused_link.statistics().last_error or "")
            async with connect_test_worker(wrong) as refused:
                assert (await refused.call("state::get", {"scope": "s", "key": "k"}))["error"][
                    "code"
                ] == "adapter_unavailable"

            caller = await stack.enter_async_context(connect_test_worker(bridge))
            ok(await caller.call("state::set", {"scope": "s", "key": "k", "value": 1}))
            assert ok(await caller.call("state::get", {"scope": "s", "key": "k"})) == 1
            client = await stack.enter_async_context(client_of(other))
            await client.join("s", "chat", "room")
            assert (await client.receive())["event"] == {"type": "sync", "data": []}
            ok(
                await caller.call(
                    "stream::set",
                    {"stream_name": "chat", "group_id": "room", "item_id": "m", "data": 1},
                )
            )
            assert event_of(await client.receive()) == (
                "chat",
                "room",
                "m",
                {"type": "create", "data": 1},
            )

            handler = await stack.enter_async_context(connect_test_worker(bridge))
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
            answering = await stack.enter_async_context(trio.open_nursery())
            answering.start_soon(answer_jobs, handler, seen)
            ok(await caller.call("enqueue", {"topic": "orders", "data": {"n": 1}}))
            await wait_for(lambda: seen == [{"n": 1}])
            answering.cancel_scope.cancel()
    finally:
        backend.kill()
