"""The stream module: functions through a raw worker, the client protocol through a
raw WebSocket client, on every backend (memory, file, Redis)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import orjson
import pytest
import trio
from trio_websocket import open_websocket

from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.backends import KIND_PARAMS, adapter_block, delete_prefix


def stream_config(block, **extra):
    return make_config(
        [
            {
                "class": "modules::stream::StreamModule",
                "config": {"port": 0, "host": "127.0.0.1", "adapter": block, **extra},
            }
        ]
    )


@asynccontextmanager
async def stream_engine_for(kind, tmp_path, **extra):
    block = adapter_block("stream", kind, tmp_path)
    try:
        async with open_test_engine(stream_config(block, **extra)) as engine:
            yield engine
    finally:
        if kind == "redis":
            await delete_prefix(block["config"]["key_prefix"])


@pytest.fixture(params=KIND_PARAMS)
async def stream_engine(request, tmp_path):
    async with stream_engine_for(request.param, tmp_path) as engine:
        yield engine


def port_of(engine):
    return engine.modules["stream"].server.listen_port


class Client:
    def __init__(self, ws):
        self.ws = ws

    async def join(self, sub, stream, group, item=None, kind="join"):
        data = {"subscriptionId": sub, "streamName": stream, "groupId": group}
        if item is not None:
            data["id"] = item
        await self.ws.send_message(orjson.dumps({"type": kind, "data": data}).decode())

    async def leave(self, sub, stream, group, item=None):
        await self.join(sub, stream, group, item, kind="leave")

    async def receive(self, timeout=10):
        with trio.fail_after(timeout):
            return orjson.loads(await self.ws.get_message())


@asynccontextmanager
async def client_of(engine, path="/", headers=None):
    async with open_websocket(
        "127.0.0.1", port_of(engine), path, use_ssl=False, extra_headers=headers or []
    ) as ws:
        yield Client(ws)


async def upgrade_status(port, authorization):
    """The HTTP status of a WebSocket upgrade request (a plain socket, so a
    refused upgrade leaves nothing open)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: " + authorization.encode() + b"\r\n\r\n"
        )
        with trio.fail_after(10):
            head = b""
            while b"\r\n" not in head:
                head += await stream.receive_some(1024)
    return int(head.split(b" ")[1])


def ok(reply):
    assert "error" not in reply, reply
    return reply.get("result")


def event_of(message):
    return (message["streamName"], message["groupId"], message["id"], message["event"])


async def test_functions(stream_engine):
    async with connect_test_worker(stream_engine) as w:
        item = {"stream_name": "chat", "group_id": "room-1", "item_id": "m1"}
        assert ok(await w.call("stream::get", item)) is None
        assert ok(await w.call("stream::set", {**item, "data": {"text": "hi"}})) == {
            "old_value": None,
            "new_value": {"text": "hi"},
        }
        assert ok(await w.call("stream::set", {**item, "data": {"text": "hey"}})) == {
            "old_value": {"text": "hi"},
            "new_value": {"text": "hey"},
        }
        reply = ok(
            await w.call(
                "stream::update",
                {**item, "ops": [{"type": "append", "path": "text", "value": "!"}]},
            )
        )
        assert reply == {"old_value": {"text": "hey"}, "new_value": {"text": "hey!"}}
        ok(
            await w.call(
                "stream::set",
                {"stream_name": "chat", "group_id": "room:2", "item_id": "a", "data": 1},
            )
        )
        ok(
            await w.call(
                "stream::set", {"stream_name": "chat:x", "group_id": "g", "item_id": "a", "data": 2}
            )
        )
        assert ok(await w.call("stream::list", {"stream_name": "chat", "group_id": "room-1"})) == [
            {"text": "hey!"}
        ]
        assert ok(await w.call("stream::list_groups", {"stream_name": "chat"})) == [
            "room-1",
            "room:2",
        ]
        assert ok(await w.call("stream::list_all", {})) == {
            "stream": [
                {"id": "chat", "groups": ["room-1", "room:2"]},
                {"id": "chat:x", "groups": ["g"]},
            ],
            "count": 2,
        }
        assert ok(await w.call("stream::delete", item)) == {"old_value": {"text": "hey!"}}
        assert ok(await w.call("stream::delete", item)) == {"old_value": None}
        assert ok(await w.call("stream::list_groups", {"stream_name": "chat"})) == ["room:2"]
        assert (
            ok(
                await w.call(
                    "stream::send",
                    {"stream_name": "chat", "group_id": "g", "type": "typing", "data": {}},
                )
            )
            is None
        )
        for bad in [
            ("stream::set", {"stream_name": "c"}),
            ("stream::list_all", None),
            ("stream::update", {**item, "ops": "x"}),
        ]:
            assert (await w.call(*bad))["error"]["code"] == "deserialization_error"


async def test_client_protocol(stream_engine):
    engine = stream_engine
    async with connect_test_worker(engine) as w, client_of(engine) as c, client_of(engine) as other:
        ok(
            await w.call(
                "stream::set",
                {"stream_name": "chat", "group_id": "r1", "item_id": "old", "data": {"n": 0}},
            )
        )
        await c.join("s-group", "chat", "r1")
        sync = await c.receive()
        assert sync["type"] == "stream" and isinstance(sync["timestamp"], int)
        assert event_of(sync) == ("chat", "r1", None, {"type": "sync", "data": [{"n": 0}]})
        await c.join("s-item", "chat", "r1", "m1")
        assert event_of(await c.receive()) == ("chat", "r1", "m1", {"type": "sync", "data": None})
        await other.join("o", "chat", "r2")
        assert (await other.receive())["event"] == {"type": "sync", "data": []}

        ok(
            await w.call(
                "stream::set",
                {"stream_name": "chat", "group_id": "r1", "item_id": "m1", "data": {"t": 1}},
            )
        )
        # one copy per matching subscription: the group one and the item one
        assert [event_of(await c.receive()) for _ in range(2)] == [
            ("chat", "r1", "m1", {"type": "create", "data": {"t": 1}})
        ] * 2
        ok(
            await w.call(
                "stream::update",
                {
                    "stream_name": "chat",
                    "group_id": "r1",
                    "item_id": "old",
                    "ops": [{"type": "increment", "path": "n", "by": 1}],
                },
            )
        )
        assert event_of(await c.receive()) == (
            "chat",
            "r1",
            "old",
            {"type": "update", "data": {"n": 1}},
        )
        ok(
            await w.call(
                "stream::send",
                {"stream_name": "chat", "group_id": "r1", "type": "typing", "data": {"who": "x"}},
            )
        )
        assert event_of(await c.receive()) == (
            "chat",
            "r1",
            None,
            {"type": "event", "event": {"type": "typing", "data": {"who": "x"}}},
        )

        await c.leave("s-group", "chat", "r1")
        # The server handles a client's messages in order and answers a join with
        # its sync: once this sync is here, the leave has been applied.
        await c.join("s-end", "chat", "end")
        assert event_of(await c.receive()) == ("chat", "end", None, {"type": "sync", "data": []})
        ok(
            await w.call(
                "stream::delete", {"stream_name": "chat", "group_id": "r1", "item_id": "m1"}
            )
        )
        # Sentinels: a connection gets its events in the order of the writes, so
        # what arrives before a sentinel is all that the writes before it sent.
        ok(
            await w.call(
                "stream::set", {"stream_name": "chat", "group_id": "end", "item_id": "x", "data": 0}
            )
        )
        ok(
            await w.call(
                "stream::set", {"stream_name": "chat", "group_id": "r2", "item_id": "x", "data": 0}
            )
        )
        # the item subscription still gets the delete; the group one, left, does not
        assert event_of(await c.receive()) == (
            "chat",
            "r1",
            "m1",
            {"type": "delete", "data": {"t": 1}},
        )
        assert event_of(await c.receive()) == ("chat", "end", "x", {"type": "create", "data": 0})
        # a different group saw none of it
        assert event_of(await other.receive()) == ("chat", "r2", "x", {"type": "create", "data": 0})

        await c.ws.send_message("not json")  # ignored, the connection stays
        await c.ws.send_message(orjson.dumps({"type": "dance", "data": {}}).decode())
        await c.join("s2", "chat", "r2")
        assert (await c.receive())["event"]["type"] == "sync"


async def test_join_triggers_can_refuse_and_leave_runs_on_close(tmp_path):
    async with stream_engine_for("memory", tmp_path) as engine, connect_test_worker(engine) as w:
        await w.send({"type": "registerfunction", "id": "w::join"})
        await w.send({"type": "registerfunction", "id": "w::leave"})
        await w.send(
            {
                "type": "registertrigger",
                "id": "tj",
                "trigger_type": "stream:join",
                "function_id": "w::join",
                "config": {},
            }
        )
        await w.send(
            {
                "type": "registertrigger",
                "id": "tl",
                "trigger_type": "stream:leave",
                "function_id": "w::leave",
                "config": {},
            }
        )
        with trio.fail_after(5):
            while len(engine.registry.triggers) < 2:
                await trio.sleep(0.01)
        seen = []

        async def answer():
            while True:
                message = await w.receive_type("invokefunction", timeout=30)
                seen.append((message["function_id"], message["data"]))
                result = (
                    {"unauthorized": message["data"]["group_id"] == "secret"}
                    if message["function_id"] == "w::join"
                    else None
                )
                await w.send(
                    {
                        "type": "invocationresult",
                        "invocation_id": message["invocation_id"],
                        "function_id": message["function_id"],
                        "result": result,
                    }
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            async with client_of(engine) as c:
                await c.join("s1", "chat", "secret")
                assert event_of(await c.receive()) == (
                    "chat",
                    "secret",
                    None,
                    {"type": "unauthorized"},
                )
                await c.join("s2", "chat", "open", "i1")
                assert (await c.receive())["event"]["type"] == "sync"
            with trio.fail_after(5):
                while not any(fid == "w::leave" for fid, _ in seen):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        joins = [d for fid, d in seen if fid == "w::join"]
        assert joins[1] == {
            "subscription_id": "s2",
            "stream_name": "chat",
            "group_id": "open",
            "id": "i1",
            "context": None,
        }
        assert [d for fid, d in seen if fid == "w::leave"] == [joins[1]]


async def test_stream_triggers_filter(stream_engine):
    engine = stream_engine
    async with connect_test_worker(engine) as w:
        await w.send({"type": "registerfunction", "id": "w::room1"})
        await w.send(
            {
                "type": "registertrigger",
                "id": "t1",
                "trigger_type": "stream",
                "function_id": "w::room1",
                "config": {"stream_name": "chat", "group_id": "r1", "item_id": ""},
            }
        )
        await w.send(
            {
                "type": "registertrigger",
                "id": "t2",
                "trigger_type": "stream",
                "function_id": "w::room1",
                "config": {"group_id": "r1"},
            }
        )
        refused = await w.receive_type("triggerregistrationresult")
        assert refused["id"] == "t2" and "stream_name" in refused["error"]["message"]
        with trio.fail_after(5):
            while len(engine.registry.triggers) < 1:
                await trio.sleep(0.01)
        async with connect_test_worker(engine) as caller:
            ok(
                await caller.call(
                    "stream::set",
                    {"stream_name": "chat", "group_id": "r2", "item_id": "x", "data": 0},
                )
            )
            ok(
                await caller.call(
                    "stream::set",
                    {"stream_name": "chat", "group_id": "r1", "item_id": "x", "data": 1},
                )
            )
        message = await w.receive_type("invokefunction")
        assert message["function_id"] == "w::room1"
        assert event_of(message["data"]) == ("chat", "r1", "x", {"type": "create", "data": 1})
        assert message["data"]["type"] == "stream"


async def test_auth_function_context_and_auth_required(tmp_path):
    for required in (False, True):
        async with stream_engine_for(
            "memory", tmp_path / str(required), auth_function="w::auth", auth_required=required
        ) as engine:
            async with connect_test_worker(engine) as w:
                await w.send({"type": "registerfunction", "id": "w::auth"})
                await w.send({"type": "registerfunction", "id": "w::join"})
                await w.send(
                    {
                        "type": "registertrigger",
                        "id": "tj",
                        "trigger_type": "stream:join",
                        "function_id": "w::join",
                        "config": {},
                    }
                )
                with trio.fail_after(5):
                    while (
                        "w::auth" not in engine.registry.functions or not engine.registry.triggers
                    ):
                        await trio.sleep(0.01)
                auth_inputs = []
                joins = []

                async def answer(auth_inputs, joins):
                    while True:
                        message = await w.receive_type("invokefunction", timeout=30)
                        data = message["data"]
                        if message["function_id"] == "w::auth":
                            auth_inputs.append(data)
                            good = data["headers"].get("authorization") == "Bearer good"
                            reply = (
                                {"result": {"context": {"user": "u1"}}}
                                if good
                                else {"error": {"code": "denied", "message": "no"}}
                            )
                        else:
                            joins.append(data)
                            reply = {"result": {"unauthorized": False}}
                        await w.send(
                            {
                                "type": "invocationresult",
                                "invocation_id": message["invocation_id"],
                                "function_id": message["function_id"],
                                **reply,
                            }
                        )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answer, auth_inputs, joins)
                    async with client_of(
                        engine, "/?token=a&token=b", [("Authorization", "Bearer good")]
                    ) as c:
                        await c.join("s", "chat", "g")
                        assert (await c.receive())["event"]["type"] == "sync"
                    assert (
                        auth_inputs[0]["query_params"] == {"token": ["a", "b"]}
                        and auth_inputs[0]["path"] == "/"
                    )
                    assert joins[0]["context"] == {"user": "u1"}
                    # A failed auth refuses the upgrade whatever auth_required says
                    # (v0.4 let the client in without a context).
                    assert await upgrade_status(port_of(engine), "Bearer bad") == 401
                    assert await upgrade_status(port_of(engine), "Bearer good") == 101
                    nursery.cancel_scope.cancel()


async def _raw_client_that_never_reads(port):
    """A WebSocket client with a tiny receive buffer that joins and then reads nothing."""
    import socket

    import wsproto
    from wsproto.events import AcceptConnection, Request, TextMessage

    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/")))
    while True:
        ws.receive_data(await stream.receive_some(4096))
        if any(isinstance(event, AcceptConnection) for event in ws.events()):
            break
    join = {"type": "join", "data": {"subscriptionId": "s", "streamName": "big", "groupId": "g"}}
    await stream.send_all(ws.send(TextMessage(data=orjson.dumps(join).decode())))
    return stream


async def test_a_client_that_stops_reading_is_disconnected(tmp_path):
    # Its socket fills, so the writer blocks in a send; its queue then
    # overflows, and the server must still drop it (not hold it forever).
    async with stream_engine_for("memory", tmp_path) as engine:
        server = engine.modules["stream"].server
        stream = await _raw_client_that_never_reads(port_of(engine))
        async with stream:
            with trio.fail_after(10):
                while not server.by_group:
                    await trio.sleep(0.01)
            (connection,) = server.connections
            blob = "x" * 16384
            for i in range(20_000):
                if connection.closed:
                    break
                await engine.invoke(
                    "stream::set",
                    {"stream_name": "big", "group_id": "g", "item_id": str(i), "data": blob},
                )
            assert connection.closed, "the client's queue never overflowed"
            with trio.fail_after(30):
                while server.connections:
                    await trio.sleep(0.05)
