"""Hostile peers of the client commands (issue 11, part C).

The commands print what peers wrote, and connect to whatever ``--url`` names:

* A hostile worker on a real engine process (:func:`running_engine`) puts
  terminal escapes, bidi overrides and line breaks in its function ids,
  descriptions, name, trigger config, results and errors: none reaches the
  terminal raw, and ``--json`` still carries the exact values.
* A fake engine (a loopback server in the test) refuses the upgrade with a
  body that never ends, closes the socket unanswered, upgrades and then says
  nothing, answers with a frame the codec refuses, floods unrelated frames,
  closes with an escaped reason, or is no engine at all.  The command ends
  with a clear message and exit code, never at its (long) ``--timeout`` and
  never by holding an unbounded body in memory.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from iii.client_io import STACKTRACE_LINES, render_json
from iii.log import CONTINUATION, escape
from tests.support import running_engine
from tests.support.cli import run_cli, serving_worker

OK, BAD_ANSWER, CALL_FAILED, UNREACHABLE = 0, 1, 4, 5

# Retitles the window, clears the screen, a C1 CSI, reverses the text, breaks
# the line (U+2028), a DEL, and a plain newline.
EVIL = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\u2028\x7f\nfake-prompt$ "
# What a terminal must never get raw (the newline between records is ours).
RAW = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def assert_terminal_safe(text: str) -> None:
    found = RAW.search(text)
    assert found is None, f"raw {found.group()!r} at {found.start()}: {text[:2000]!r}"


def assert_one_record(stderr: str) -> None:
    """One line for the error, then only continuation lines (a stack trace)."""
    first, *rest = stderr.rstrip("\n").split("\n")
    assert first.startswith("iii: "), stderr
    assert all(line.startswith(CONTINUATION) for line in rest), stderr


def test_json_output_escapes_what_the_log_escapes() -> None:
    """Every character iii.log.escape escapes is escaped in the JSON output too,
    and the JSON value stays the same."""
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF:
            continue  # no JSON string holds a lone surrogate
        char = chr(code)
        text = render_json(f"a{char}b")  # one line: a string and the final newline
        assert orjson.loads(text) == f"a{char}b"
        if escape(char) != char:
            assert char not in text[:-1], hex(code)


# -- a hostile worker on a real engine ------------------------------------------------------


async def evil_error(data: Any) -> Any:
    stacktrace = "\n".join(f"frame {n}: {EVIL}" for n in range(STACKTRACE_LINES * 3))
    return {"error": {"code": f"E{EVIL}", "message": f"failed {EVIL}", "stacktrace": stacktrace}}


async def evil_result(data: Any) -> Any:
    return {"result": {"text": EVIL, EVIL: [EVIL]}}


async def test_peer_strings_never_reach_the_terminal_raw(tmp_path: Path) -> None:
    config = {"modules": [{"class": "modules::pubsub::PubSubModule"}]}
    failing, answering = f"evil::{EVIL}", "evil::result"
    trigger = {
        "id": f"t{EVIL}",
        "trigger_type": "subscribe",
        "function_id": answering,
        "config": {"topic": EVIL},
    }
    async with running_engine(tmp_path, config) as engine:
        async with serving_worker(
            engine.port,
            {failing: evil_error, answering: evil_result},
            triggers=[trigger],
            descriptions={failing: EVIL, answering: EVIL * 200},
            metadata={"name": EVIL, "version": EVIL, "runtime": EVIL},
        ):
            url = engine.url
            for kind in ("functions", "workers", "triggers"):
                done = await run_cli(kind, "--url", url)
                assert done.code == OK, done
                assert_terminal_safe(done.stdout)
                # One line per entry: the header, this worker's entries (and "publish").
                assert len(done.stdout.splitlines()) == (4 if kind == "functions" else 2), done
                assert "\\x1b]0;owned\\x07" in done.stdout

                done = await run_cli(kind, "--json", "--url", url)
                assert done.code == OK, done
                assert_terminal_safe(done.stdout)
                entries = done.json
                if kind == "functions":
                    descriptions = {e["function_id"]: e["description"] for e in entries}
                    assert descriptions[failing] == EVIL  # the exact value
                elif kind == "workers":
                    assert entries[0]["name"] == EVIL
                else:
                    assert entries == [trigger]

            done = await run_cli("trigger", failing, "--url", url)
            assert done.code == CALL_FAILED, done
            assert_terminal_safe(done.stderr)
            assert_one_record(done.stderr)
            assert "failed \\x1b]0;owned" in done.stderr
            # The stack trace is cut after STACKTRACE_LINES lines.
            assert len(done.stderr.splitlines()) == 1 + STACKTRACE_LINES + 1, done.stderr[-500:]

            done = await run_cli("trigger", answering, "--url", url)
            assert done.code == OK, done
            assert_terminal_safe(done.stdout)
            assert done.json == {"text": EVIL, EVIL: [EVIL]}


# -- a fake engine -------------------------------------------------------------------------

Behaviour = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def fake_engine(behaviour: Behaviour) -> AsyncIterator[str]:
    """A loopback server that treats each connection with ``behaviour``; yields its URL."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await behaviour(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command left: what it should do

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"ws://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def read_request(stream: trio.SocketStream) -> bytes:
    request = b""
    while b"\r\n\r\n" not in request:
        data = await stream.receive_some(4096)
        if not data:
            raise trio.BrokenResourceError
        request += data
    return request


async def refuse_forever(stream: trio.SocketStream) -> None:
    await read_request(stream)
    await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    while True:
        await stream.send_all(chunk)


async def close_unanswered(stream: trio.SocketStream) -> None:
    await read_request(stream)


async def not_an_engine(stream: trio.SocketStream) -> None:
    await read_request(stream)
    body = b"<html>\x1b[2Jhello</html>"
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/html\r\n\r\n%s"
        % (len(body), body)
    )
    await trio.sleep(30)


def websocket(
    serve: Callable[[WebSocketConnection], Awaitable[None]],
) -> Behaviour:
    """A behaviour that accepts the upgrade and hands the WebSocket to ``serve``."""

    async def behaviour(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream, max_message_size=2**26)
            ws = await request.accept()
            try:
                await serve(ws)
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()

    return behaviour


async def greet(ws: WebSocketConnection) -> None:
    worker_id = "0b6e5c8e-8a55-4f3a-9d8e-1c2b3a4d5e6f"
    await ws.send_message(
        orjson.dumps({"type": "workerregistered", "worker_id": worker_id}).decode()
    )


def answering(answer: Callable[[dict[str, Any]], Awaitable[list[str]]]) -> Behaviour:
    """Greets, acknowledges engine::workers::register, and sends ``answer(call)``'s frames
    for any other call."""

    async def serve(ws: WebSocketConnection) -> None:
        await greet(ws)
        while True:
            call = orjson.loads(await ws.get_message())
            if call.get("function_id") == "engine::workers::register":
                reply = {"type": "invocationresult", "invocation_id": call["invocation_id"]}
                reply.update(function_id=call["function_id"], result={"success": True})
                await ws.send_message(orjson.dumps(reply).decode())
                continue
            for frame in await answer(call):
                await ws.send_message(frame)

    return websocket(serve)


def result_frame(call: dict[str, Any], **fields: Any) -> str:
    message = {"type": "invocationresult", "invocation_id": call["invocation_id"]}
    message.update(function_id=call["function_id"], **fields)
    return orjson.dumps(message).decode()


async def test_an_endless_refusal_is_cut_off() -> None:
    async with fake_engine(refuse_forever) as url:
        done = await run_cli("functions", "--url", url, "--timeout", "300")
    assert done.code == UNREACHABLE, done
    assert "without completing the upgrade" in done.stderr


async def test_a_socket_closed_before_the_upgrade_fails_at_once() -> None:
    async with fake_engine(close_unanswered) as url:
        done = await run_cli("trigger", "demo::echo", "--url", url, "--timeout", "300")
    assert done.code == UNREACHABLE, done
    assert "without answering the WebSocket upgrade" in done.stderr


async def test_not_an_engine() -> None:
    async with fake_engine(not_an_engine) as url:
        done = await run_cli("functions", "--url", url, "--timeout", "300")
    assert done.code == UNREACHABLE, done
    assert "HTTP 200" in done.stderr
    assert_terminal_safe(done.stderr)

    async def silent(ws: WebSocketConnection) -> None:
        await trio.sleep_forever()

    async with fake_engine(websocket(silent)) as url:
        done = await run_cli("functions", "--url", url, "--timeout", "2")
    assert done.code == UNREACHABLE, done
    assert "while connecting" in done.stderr


async def test_an_answer_that_cannot_be_read_fails_the_call() -> None:
    async def too_deep(call: dict[str, Any]) -> list[str]:
        # Written by hand: orjson writes no more than about 254 levels.
        frame = result_frame(call, result="DEEP")
        return [frame.replace('"DEEP"', "[" * 300 + "0" + "]" * 300)]

    async with fake_engine(answering(too_deep)) as url:
        done = await run_cli("trigger", "demo::echo", "--url", url, "--timeout", "300")
    assert done.code == BAD_ANSWER, done
    assert "cannot be read" in done.stderr and "nested" in done.stderr


async def test_unrelated_frames_are_skipped() -> None:
    async def flood(call: dict[str, Any]) -> list[str]:
        other = {**call, "invocation_id": "7d3c5e2a-9f1b-4c6d-8e7f-0a1b2c3d4e5f"}
        noise = [
            "not json",
            '{"type": "nonsense"}',
            '{"type": "invocationresult"}',
            result_frame(other, result="not yours"),
            orjson.dumps({"type": "ping"}).decode(),
        ]
        return noise * 200 + [result_frame(call, result={"ok": True})]

    async with fake_engine(answering(flood)) as url:
        done = await run_cli("trigger", "demo::echo", "--url", url, "--timeout", "300")
    assert (done.code, done.json) == (OK, {"ok": True}), done


async def test_a_close_reason_is_escaped() -> None:
    async def close_rudely(ws: WebSocketConnection) -> None:
        await greet(ws)
        await ws.get_message()
        await ws.aclose(code=1011, reason=EVIL[:60])

    async with fake_engine(websocket(close_rudely)) as url:
        done = await run_cli("functions", "--url", url, "--timeout", "300")
    assert done.code == UNREACHABLE, done
    assert "code 1011" in done.stderr
    assert_terminal_safe(done.stderr)
    assert_one_record(done.stderr)


async def test_the_token_goes_in_the_authorization_header_only() -> None:
    seen: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        seen.append(await read_request(stream))

    async with fake_engine(record) as url:
        env = {"III_TOKEN": "s3cret-token-value"}
        done = await run_cli("trigger", "demo::echo", "--url", url, env=env)
    assert done.code == UNREACHABLE and "s3cret" not in done.stderr, done
    assert len(seen) == 1
    headers = seen[0].decode().split("\r\n")
    assert headers[0] == "GET / HTTP/1.1"
    assert "Authorization: Bearer s3cret-token-value" in headers
    assert sum("s3cret" in line for line in headers) == 1
