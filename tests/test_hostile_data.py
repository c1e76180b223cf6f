"""Hostile data against a real engine process (issue 10 rows 2, 3, 4 and 12).

Each test runs ``python -m iii serve`` as a child process and attacks it over
real sockets with raw WebSocket workers, then checks the three promises:
the attacker gets a clear error, the engine keeps serving, and the other
workers stay connected (and, for the store, every acknowledged write
survives a restart).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket

from iii.json_limits import MAX_DEPTH
from iii.modules.rest_api.server import HttpRequest, HttpServer, Responder
from iii.testing import RawWorker
from tests.support import EngineProcess, reserve_port, running_engine


def nested(depth: int) -> Any:
    """A JSON value ``depth`` containers deep: ``[[...[0]...]]``."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def depth_of(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


@asynccontextmanager
async def raw_worker(
    engine: EngineProcess, max_message_size: int = 1024 * 1024
) -> AsyncIterator[RawWorker]:
    async with open_websocket(
        "127.0.0.1", engine.port, "/", use_ssl=False, max_message_size=max_message_size
    ) as ws:
        worker = RawWorker(ws)
        registered = await worker.receive_type("workerregistered", timeout=10)
        worker.worker_id = registered["worker_id"]
        yield worker


@asynccontextmanager
async def trigger_worker(
    engine: EngineProcess,
    function_id: str,
    trigger_type: str,
    config: Any,
    answer_with: Callable[[Any], Any] = lambda data: None,
) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    """A worker with one function bound to one trigger; yields what it is invoked with.

    It answers every invocation with ``answer_with(data)``, as an SDK worker would.
    """
    send, receive = trio.open_memory_channel[Any](100)
    async with raw_worker(engine) as worker, trio.open_nursery() as nursery:
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

        async def answer() -> None:
            while True:
                message = await worker.receive_type("invokefunction", timeout=3600)
                await worker.send(
                    {
                        "type": "invocationresult",
                        "invocation_id": message["invocation_id"],
                        "function_id": message["function_id"],
                        "result": answer_with(message["data"]),
                    }
                )
                await send.send(message["data"])

        # The registration is filed once an engine round trip has passed.
        await worker.call("engine::workers::list", {}, timeout=10)
        nursery.start_soon(answer)  # from now on, the only reader of the socket
        yield receive
        nursery.cancel_scope.cancel()


async def call(
    worker: RawWorker, function_id: str, data: Any, timeout: float = 10
) -> dict[str, Any]:
    """``RawWorker.call``, with the frame written by the stdlib encoder (orjson
    cannot write data nested deeper than about 254 levels)."""
    invocation_id = str(uuid.uuid4())
    message = {"type": "invokefunction", "function_id": function_id, "invocation_id": invocation_id}
    await worker.send(json.dumps({**message, "data": data}))
    with trio.fail_after(timeout):
        while True:
            result = await worker.receive_type("invocationresult", timeout)
            if result["invocation_id"] == invocation_id:
                return result
            worker.backlog.append(result)


def refused_as_too_deep(reply: dict[str, Any]) -> None:
    assert reply.get("error", {}).get("code") == "deserialization_error", reply
    assert f"nested deeper than {MAX_DEPTH} levels" in reply["error"]["message"], reply


# -- row 2: data nested too deep never reaches a trigger, and never crashes the engine ------

# trigger type, its config, and the call that fires it with some data
DEEP_ATTACKS = {
    "publish->subscribe": (
        "subscribe",
        {"topic": "deep"},
        lambda data: ("publish", {"topic": "deep", "data": data}),
    ),
    "stream::send->stream": (
        "stream",
        {"stream_name": "s"},
        lambda data: (
            "stream::send",
            {"stream_name": "s", "group_id": "g", "type": "t", "data": data},
        ),
    ),
    "engine::log::info->log": (
        "log",
        {"level": "all"},
        lambda data: ("engine::log::info", {"message": "m", "data": data}),
    ),
    "enqueue->queue": (
        "queue",
        {"topic": "deep"},
        lambda data: ("enqueue", {"topic": "deep", "data": data}),
    ),
}

DEEP_CONFIG = {
    "modules": [
        {"class": "modules::pubsub::PubSubModule"},
        {"class": "modules::stream::StreamModule", "config": {"port": 0}},
        {"class": "modules::queue::QueueModule"},
        {
            "class": "modules::observability::OtelModule",
            "config": {"enabled": True, "exporter": "memory", "prometheus_enabled": False},
        },
    ]
}


def _deepest_list(value: Any) -> int:
    """The depth of the deepest ``[[...]]`` chain anywhere in ``value``."""
    if isinstance(value, dict):
        return max((_deepest_list(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return depth_of(value)
    return 0


@pytest.mark.parametrize("attack", sorted(DEEP_ATTACKS))
async def test_data_nested_too_deep_is_refused_and_the_engine_keeps_serving(tmp_path, attack):
    trigger_type, trigger_config, make_call = DEEP_ATTACKS[attack]
    async with running_engine(tmp_path, DEEP_CONFIG) as engine:
        victim = trigger_worker(engine, "victim::on_event", trigger_type, trigger_config)
        async with victim as events:
            async with raw_worker(engine) as attacker:
                function_id, data = make_call(nested(300))
                refused_as_too_deep(await call(attacker, function_id, data))
                # The deepest value a frame can carry (message object, data
                # object, value) is accepted and reaches the trigger intact.
                function_id, data = make_call(nested(MAX_DEPTH - 2))
                reply = await call(attacker, function_id, data)
                assert "error" not in reply, reply
                with trio.fail_after(10):
                    event = await events.receive()
                    while not _deepest_list(event):  # (log triggers also get the engine's logs)
                        event = await events.receive()
                assert _deepest_list(event) == MAX_DEPTH - 2, event
                function_id, data = make_call(nested(MAX_DEPTH - 1))
                refused_as_too_deep(await call(attacker, function_id, data))
        assert engine.process is not None and engine.process.poll() is None, engine.log_text()


# -- row 3: a worker answering with a result nested too deep ---------------------------------


async def test_a_result_nested_too_deep_fails_the_call_and_both_workers_stay(tmp_path):
    async with running_engine(tmp_path, {"modules": []}) as engine:
        async with raw_worker(engine) as callee, raw_worker(engine) as caller:
            await callee.send({"type": "registerfunction", "id": "deep::answer"})
            await callee.call("engine::workers::list", {}, timeout=10)  # registered

            async def answer_once(result: Any) -> None:
                message = await callee.receive_type("invokefunction", timeout=10)
                await callee.send(
                    json.dumps(
                        {
                            "type": "invocationresult",
                            "invocation_id": message["invocation_id"],
                            "function_id": message["function_id"],
                            "result": result,
                        }
                    )
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_once, nested(300))
                refused_as_too_deep(await call(caller, "deep::answer", {}))
            # Both connections are up: the same call, answered sensibly, goes through.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_once, nested(MAX_DEPTH - 2))
                reply = await call(caller, "deep::answer", {})
            assert depth_of(reply["result"]) == MAX_DEPTH - 2, reply
        assert engine.process is not None and engine.process.poll() is None


# -- row 2: the other ways JSON comes in ----------------------------------------------------


async def test_a_rest_body_nested_too_deep_is_a_400(tmp_path):
    port = reserve_port()
    rest = {"class": "modules::api::RestApiModule", "config": {"port": port, "host": "127.0.0.1"}}
    config = {"modules": [rest]}
    async with running_engine(tmp_path, config) as engine:
        route = {"api_path": "deep", "http_method": "POST"}

        def answer(data: Any) -> Any:
            return {"status_code": 200, "body": {"depth": depth_of(data["body"])}}

        async with trigger_worker(engine, "api::deep", "http", route, answer) as requests:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                post = lambda value: client.post(  # noqa: E731
                    "/deep", content=json.dumps(value), headers={"content-type": "application/json"}
                )
                with trio.fail_after(10):
                    while (response := await post(nested(MAX_DEPTH))).status_code == 404:
                        await trio.sleep(0.05)  # until the route is live
                assert response.status_code == 200 and response.json() == {"depth": MAX_DEPTH}
                response = await post(nested(MAX_DEPTH + 1))
                assert response.status_code == 400, response.text
                message = response.json()["error"]["message"]
                assert f"nested deeper than {MAX_DEPTH} levels" in message
                # Deeper than orjson can read at all (1024): the same answer.
                response = await client.post(
                    "/deep",
                    content="[" * 5000 + "]" * 5000,
                    headers={"content-type": "application/json"},
                )
                assert response.status_code == 400, response.text
            assert depth_of((await requests.receive())["body"]) == MAX_DEPTH
        assert engine.process is not None and engine.process.poll() is None


class _DeepAnswers:
    """An HTTP server playing an HTTP-invoked function that answers too deep."""

    async def __call__(self, request: HttpRequest, responder: Responder) -> None:
        await request.read_all(1 << 20)
        depth = int(request.path.rsplit("/", 1)[-1])
        content = json.dumps(nested(depth)).encode()
        await responder.respond(200, [(b"content-type", b"application/json")], content)


async def test_an_http_function_answering_too_deep_fails_the_call(tmp_path):
    config = {
        "modules": [
            {
                "class": "modules::http_functions::HttpFunctionsModule",
                "config": {"security": {"require_https": False, "block_private_ips": False}},
            }
        ]
    }
    server = HttpServer(_DeepAnswers())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", 0)
        async with running_engine(tmp_path, config) as engine, raw_worker(engine) as worker:
            for depth in (MAX_DEPTH - 1, MAX_DEPTH + 1):
                invocation = {"url": f"http://127.0.0.1:{server.port}/{depth}"}
                await worker.send(
                    {"type": "registerfunction", "id": f"ext::d{depth}", "invocation": invocation}
                )
            await worker.call("engine::workers::list", {}, timeout=10)
            reply = await call(worker, f"ext::d{MAX_DEPTH - 1}", {})
            assert depth_of(reply.get("result")) == MAX_DEPTH - 1, reply
            reply = await call(worker, f"ext::d{MAX_DEPTH + 1}", {})
            assert reply["error"]["code"] == "invalid_response", reply
            assert f"nested deeper than {MAX_DEPTH} levels" in reply["error"]["message"]
            assert engine.process is not None and engine.process.poll() is None
        nursery.cancel_scope.cancel()


# -- row 4: a write that answers an error changes nothing, and the store stays readable ------

KiB = 1024


def _state_config(store: Path, **state_config: Any) -> dict[str, Any]:
    adapter = {
        "class": "modules::state::adapters::KvStore",
        "config": {"store_method": "file_based", "file_path": str(store)},
    }
    return {
        "modules": [
            {"class": "modules::state::StateModule", "config": {"adapter": adapter, **state_config}}
        ]
    }


async def test_a_value_grown_past_the_limit_is_refused_and_every_later_write_survives(tmp_path):
    store = tmp_path / "state-store"
    engine = EngineProcess.write(tmp_path, _state_config(store, max_value_bytes=64 * KiB))
    engine.start()
    try:
        await engine.started()
        async with raw_worker(engine) as worker:
            chunk = "x" * (20 * KiB)
            codes = []
            for _ in range(5):  # the attack, scaled down: root appends past the limit
                reply = await call(
                    worker,
                    "state::update",
                    {"scope": "s", "key": "big", "ops": [{"type": "append", "value": chunk}]},
                )
                codes.append(reply.get("error", {}).get("code"))
            assert codes == [None, None, None, "VALUE_TOO_LARGE", "VALUE_TOO_LARGE"], codes
            reply = await call(worker, "state::get", {"scope": "s", "key": "big"})
            assert reply["result"] == 3 * chunk
            too_large = {"scope": "s", "key": "one", "value": "y" * 65 * KiB}
            reply = await call(worker, "state::set", too_large)
            assert reply["error"]["code"] == "VALUE_TOO_LARGE", reply
            for n in range(100):
                reply = await call(worker, "state::set", {"scope": "s", "key": f"k{n}", "value": n})
                assert "error" not in reply, reply
        assert engine.terminate() == 0  # a clean restart
        engine.start()
        await engine.started()
        async with raw_worker(engine) as worker:
            for n in range(100):
                reply = await call(worker, "state::get", {"scope": "s", "key": f"k{n}"})
                assert reply.get("result") == n, (n, reply)
            reply = await call(worker, "state::get", {"scope": "s", "key": "big"})
            assert reply["result"] == 3 * chunk
            reply = await call(worker, "state::get", {"scope": "s", "key": "one"})
            assert reply.get("result") is None
        assert not list(store.glob("*corrupt*")), list(store.iterdir())
        assert "could not be read" not in engine.log_text()
    finally:
        engine.kill()


async def test_a_write_whose_answer_would_not_reach_the_caller_is_refused(tmp_path):
    # A raw worker that announced nothing is taken for a 0.4.1 SDK: its frames
    # are capped at 1 MiB, so {old_value, new_value} must fit in that.
    config = _state_config(tmp_path / "state-store", max_value_bytes=4096 * KiB)
    async with running_engine(tmp_path, config) as engine:
        async with raw_worker(engine) as legacy, raw_worker(engine, 64 * 1024 * KiB) as modern:
            await modern.call(
                "engine::workers::register", {"features": ["large-messages.v1"]}, timeout=10
            )
            value = "v" * (700 * KiB)
            reply = await call(legacy, "state::set", {"scope": "s", "key": "k", "value": value})
            assert "error" not in reply, reply["error"]
            append = {"type": "append", "value": "w" * (100 * KiB)}
            more = {"scope": "s", "key": "k", "ops": [append]}
            reply = await call(legacy, "state::update", more)
            assert reply["error"]["code"] == "payload_too_large", reply["error"]
            assert "nothing was changed" in reply["error"]["message"]
            reply = await call(legacy, "state::set", {"scope": "s", "key": "k", "value": value})
            assert reply["error"]["code"] == "payload_too_large"  # old + new > 1 MiB
            reply = await call(legacy, "state::get", {"scope": "s", "key": "k"})
            assert reply["result"] == value  # unchanged
            reply = await call(modern, "state::update", more)  # the same write, for a worker
            assert "error" not in reply  # that can take the answer
            assert len(reply["result"]["new_value"]) == 800 * KiB
            for size in (900, 1000, 1100):
                reply = await call(modern, "state::update", more)
                assert len(reply["result"]["new_value"]) == size * KiB
            reply = await call(legacy, "state::delete", {"scope": "s", "key": "k"})
            assert reply["error"]["code"] == "payload_too_large"  # the old value is the answer
            reply = await call(modern, "state::delete", {"scope": "s", "key": "k"})
            assert len(reply["result"]) == 1100 * KiB


# -- row 12: arithmetic that overflows is an op error, and stores nothing ----------------------


async def test_an_overflowing_increment_is_an_error_and_the_value_stays(tmp_path):
    store = tmp_path / "state-store"
    engine = EngineProcess.write(tmp_path, _state_config(store))
    engine.start()
    try:
        await engine.started()
        async with raw_worker(engine) as worker:
            ops = [
                {"type": "increment", "path": "f", "by": 1.7e308},
                {"type": "increment", "path": "i", "by": 2**63},
            ]
            replies = [
                await call(worker, "state::update", {"scope": "s", "key": "n", "ops": ops})
                for _ in range(2)
            ]
            assert "errors" not in replies[0]["result"], replies[0]
            assert [e["code"] for e in replies[1]["result"]["errors"]] == [
                "increment.overflow",
                "increment.overflow",
            ]
            assert replies[1]["result"]["new_value"] == {"f": 1.7e308, "i": 2**63}
        assert engine.terminate() == 0
        engine.start()
        await engine.started()
        async with raw_worker(engine) as worker:
            reply = await call(worker, "state::get", {"scope": "s", "key": "n"})
            assert reply["result"] == {"f": 1.7e308, "i": 2**63}  # not null, not lost
    finally:
        engine.kill()
