"""Who answers an HTTP request when a function both streams and returns a value.

A Motia 1.0 step on ``iii-sdk`` 0.9.0 does exactly that (captured on the
wire; spec: README "What iii-sdk 0.9.0 sends"): it opens the response
channel, sends ``set_status`` and ``set_headers``, returns its value
(``{"status": 202, "body": ..., "headers": ...}``) on the worker socket, and
only then writes the body and closes the channel, from tasks of its own.
The engine must give the client the streamed answer every time, whatever the
order in which the two sockets are read, and keep the connection alive.

The order is forced here with a raw worker: the body is written only once the
engine has taken the call's value (the invocation has left the pending table).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from iii.engine import Engine
from iii.testing import RawWorker, connect_test_worker
from tests.modules.rest_api.helpers import (
    add_route,
    open_channel_side,
    open_rest_engine,
    request_on,
    wait_until,
)

STATUS = orjson.dumps({"type": "set_status", "status_code": 202}).decode()
HEADERS = orjson.dumps({"type": "set_headers", "headers": {"X-Step": "accept"}}).decode()
BODY = b'{"accepted": true}'
VALUE = {"status": 202, "body": {"accepted": True}, "headers": {"X-Step": "accept"}}

# (engine, worker, invokefunction message): answers the call its own way.
Answer = Callable[[Engine, RawWorker, dict[str, Any]], Awaitable[None]]


def result_of(message: dict[str, Any], value: Any) -> dict[str, Any]:
    return {
        "type": "invocationresult",
        "invocation_id": message["invocation_id"],
        "function_id": message["function_id"],
        "result": value,
    }


async def until_taken(engine: Engine, invocation_id: str) -> None:
    """Until the engine has taken the call's value (the invocation left the table)."""
    await wait_until(lambda: invocation_id not in engine.pending.by_id)


async def value_first(engine: Engine, worker: RawWorker, message: dict[str, Any]) -> None:
    """Motia's order, the value read before the body: status, headers, value, body, close."""
    async with open_channel_side(engine, message["data"]["response"], "write") as side:
        await side.send(STATUS)
        await side.send(HEADERS)
        await worker.send(result_of(message, VALUE))
        await until_taken(engine, message["invocation_id"])
        try:
            await side.ws.send_message(BODY)
        except ConnectionClosed:
            pass  # the engine answered from the value and removed the channel


async def body_first(engine: Engine, worker: RawWorker, message: dict[str, Any]) -> None:
    """The same answer, the body read before the value."""
    async with open_channel_side(engine, message["data"]["response"], "write") as side:
        await side.send(STATUS)
        await side.send(HEADERS)
        await side.ws.send_message(BODY)
    await worker.send(result_of(message, VALUE))


async def serve_calls(engine: Engine, worker: RawWorker, answer: Answer) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            message = await worker.receive_type("invokefunction", timeout=3600)
            nursery.start_soon(answer, engine, worker, message)


@pytest.mark.parametrize("answer", [value_first, body_first], ids=["value-first", "body-first"])
async def test_a_streamed_answer_wins_over_the_returned_value(answer: Answer, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="iii")
    async with open_rest_engine() as (engine, base), connect_test_worker(engine) as worker:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_calls, engine, worker, answer)
            await add_route(engine, worker, "t::step", "/accept")
            port = engine.modules["rest_api"].port
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                client = h11.Connection(h11.CLIENT)
                for _ in range(4):  # one kept-alive connection
                    status, headers, body = await request_on(stream, client, "/accept")
                    assert (status, headers.get(b"x-step"), body) == (202, b"accept", BODY)
            await wait_until(lambda: len(engine.channels) == 0 and engine.inflight == 0)
            nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


async def test_a_value_alone_still_answers() -> None:
    """A function that never opens its response channel answers with its value
    (0.4.1, 0.25 and plain 0.9.0 handlers), even when it returns at once."""

    async def plain(engine: Engine, worker: RawWorker, message: dict[str, Any]) -> None:
        await worker.send(result_of(message, {"status_code": 201, "body": {"n": 1}}))

    async with open_rest_engine() as (engine, base), connect_test_worker(engine) as worker:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_calls, engine, worker, plain)
            await add_route(engine, worker, "t::plain", "/plain")
            port = engine.modules["rest_api"].port
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                client = h11.Connection(h11.CLIENT)
                for _ in range(2):
                    status, headers, body = await request_on(stream, client, "/plain")
                    assert (status, headers[b"content-type"]) == (201, b"application/json")
                    assert orjson.loads(body) == {"n": 1}
            nursery.cancel_scope.cancel()
