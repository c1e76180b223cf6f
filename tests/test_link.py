"""The engine link (iii/link.py) against real engines over real sockets.

The remote is an engine in the test's nursery (:func:`iii.testing.open_test_engine`)
with engine functions registered in-process, or, for the hostile cases, a
WebSocket server that speaks just enough of the protocol to misbehave.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from iii.engine import Engine
from iii.errors import IIIError, TriggerRegistrationError
from iii.link import EngineLink, LinkConfig, TraceContext
from iii.native import CallContext
from iii.registry import LogicalTrigger
from iii.testing import make_config, open_test_engine
from tests.support import free_port

TOKEN = "bridge-token-0123456789abcdef"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FAST: dict[str, Any] = {"backoff_initial_s": 0.02, "backoff_max_s": 0.2, "connect_timeout_s": 5.0}


@asynccontextmanager
async def running_link(config: LinkConfig) -> AsyncIterator[EngineLink]:
    link = EngineLink(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        yield link
        nursery.cancel_scope.cancel()


def remote_config(port: int = 0, **keys: Any) -> Any:
    return attrs.evolve(make_config(**keys), port=port)


def link_to(engine: Engine, **keys: Any) -> LinkConfig:
    url = f"ws://127.0.0.1:{engine.listen_port}"
    return LinkConfig(url=url, name="test-link", **{**FAST, **keys})


def serve_demo_functions(engine: Engine, seen: list[CallContext]) -> None:
    async def echo(data: Any, ctx: CallContext) -> Any:
        seen.append(ctx)
        return {"echo": data}

    async def refuse(data: Any, ctx: CallContext) -> Any:
        raise IIIError("not today", code="demo_refused", stacktrace="at demo")

    engine.register_function("demo::echo", echo)
    engine.register_function("demo::refuse", refuse)


def link_worker_id(engine: Engine) -> str:
    names = [
        worker_id
        for worker_id, info in engine.registry.workers.items()
        if info.name == "test-link" and worker_id in engine.connections
    ]
    assert len(names) == 1, names
    return names[0]


async def test_calls_both_ways_with_trace_context_and_remote_error_codes() -> None:
    seen: list[CallContext] = []
    async with open_test_engine(remote_config()) as remote:
        serve_demo_functions(remote, seen)
        async with running_link(link_to(remote)) as link:
            received: list[tuple[Any, TraceContext]] = []

            async def double(data: Any, trace: TraceContext) -> Any:
                received.append((data, trace))
                if data == "fail":
                    raise IIIError("exposed handler refused", code="link_refused")
                return data * 2

            link.expose("link::double", double, description="doubles")
            assert await link.wait_connected(10)
            assert link.statistics().connections == 1

            # This engine -> remote: result, trace context, the remote's own error code.
            trace = TraceContext(traceparent=TRACEPARENT, baggage="k=v")
            assert await link.call("demo::echo", [1, "é"], timeout_s=10, trace=trace) == {
                "echo": [1, "é"]
            }
            assert (seen[-1].traceparent, seen[-1].baggage) == (TRACEPARENT, "k=v")
            with pytest.raises(IIIError) as refused:
                await link.call("demo::refuse", {}, timeout_s=10)
            assert (refused.value.code, refused.value.message) == ("demo_refused", "not today")
            assert refused.value.stacktrace == "at demo"
            with pytest.raises(IIIError) as missing:
                await link.call("demo::missing", {}, timeout_s=10)
            assert missing.value.code == "function_not_found"

            # Remote -> this engine, through the exposed function, with its error code.
            assert await remote.invoke("link::double", 21, traceparent=TRACEPARENT) == 42
            assert received[-1][1].traceparent == TRACEPARENT
            with pytest.raises(IIIError) as exposed_error:
                await remote.invoke("link::double", "fail")
            assert exposed_error.value.code == "link_refused"

            # Fire-and-forget reaches the remote.
            voided = trio.Event()

            async def record_void(data: Any, ctx: CallContext) -> Any:
                voided.set()

            remote.register_function("demo::void", record_void)
            await link.call_void("demo::void", "void")
            with trio.fail_after(10):
                await voided.wait()

            # Unexposed: gone from the remote.
            gone = trio.Event()
            remote.function_listeners.append(
                lambda: None if "link::double" in remote.registry.functions else gone.set()
            )
            link.unexpose("link::double")
            with trio.fail_after(10):
                await gone.wait()


async def test_remote_restart_is_survived_and_calls_fail_at_once_while_down() -> None:
    port = free_port()
    seen: list[CallContext] = []
    config = LinkConfig(url=f"ws://127.0.0.1:{port}", name="test-link", **FAST)
    async with running_link(config) as link:

        async def answer(data: Any, trace: TraceContext) -> Any:
            return {"from": "link", "data": data}

        link.expose("link::answer", answer)
        link.register_service("bridge-test", name="Bridge test")
        async with open_test_engine(remote_config(port)) as first:
            serve_demo_functions(first, seen)
            assert await link.wait_connected(10)
            assert await first.invoke("link::answer", 1) == {"from": "link", "data": 1}
            first.request_shutdown()
            assert await link.wait_disconnected(10)

        # Down: a call with a long timeout fails at once with bridge_unavailable,
        # long before a sentinel sleeping for that timeout wakes.
        timeout_passed = trio.Event()
        outcome: list[IIIError] = []

        async def sentinel() -> None:
            await trio.sleep(60)
            timeout_passed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sentinel)
            with pytest.raises(IIIError) as down:
                await link.call("demo::echo", {}, timeout_s=60)
            outcome.append(down.value)
            nursery.cancel_scope.cancel()
        assert outcome[0].code == "bridge_unavailable"
        assert not timeout_passed.is_set()
        with pytest.raises(IIIError) as down_void:
            await link.call_void("demo::echo", {})
        assert down_void.value.code == "bridge_unavailable"
        with pytest.raises(IIIError) as adapter_down:
            await link.call("state::get", {}, timeout_s=60, unavailable_code="adapter_unavailable")
        assert adapter_down.value.code == "adapter_unavailable"

        # A new engine on the same port: the link reconnects and re-registers.
        async with open_test_engine(remote_config(port)) as second:
            serve_demo_functions(second, seen)
            assert await link.wait_connected(15)
            assert await link.call("demo::echo", "again", timeout_s=10) == {"echo": "again"}
            assert await second.invoke("link::answer", 2) == {"from": "link", "data": 2}
            assert link.statistics().connections == 2


async def test_calls_in_flight_end_invocation_stopped_when_the_link_drops() -> None:
    async with open_test_engine(remote_config()) as remote:
        started = trio.Event()

        async def hang(data: Any, ctx: CallContext) -> Any:
            started.set()
            await trio.sleep_forever()

        async def echo(data: Any, ctx: CallContext) -> Any:
            return data

        remote.register_function("demo::hang", hang)
        remote.register_function("demo::echo", echo)
        async with running_link(link_to(remote)) as link:
            assert await link.wait_connected(10)
            first_worker = link_worker_id(remote)
            errors: list[IIIError] = []

            async def in_flight() -> None:
                with pytest.raises(IIIError) as stopped:
                    await link.call("demo::hang", {}, timeout_s=60)
                errors.append(stopped.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await started.wait()
                assert link.statistics().calls_in_flight == 1
                remote.connections[first_worker].abort("test: drop the link")
            assert errors[0].code == "invocation_stopped"
            # Back, as a new worker.
            assert await link.wait_connected(10)
            assert await link.call("demo::echo", 5, timeout_s=10) == 5
            assert link_worker_id(remote) != first_worker


async def test_reattach_is_sent_with_the_previous_token_after_a_drop() -> None:
    async def close_on_call(ws: WebSocketConnection, message: dict[str, Any]) -> None:
        await ws.aclose(code=1011, reason="drop")

    async with fake_remote(close_on_call) as (port, connections, received):
        async with running_link(LinkConfig(url=f"ws://127.0.0.1:{port}", **FAST)) as link:
            assert await link.wait_connected(10)
            with pytest.raises(IIIError):
                await link.call("x", {}, timeout_s=60)
            assert await link.wait_connected(10)
    first_on_second = [m for m in received[1] if m["type"] != "invokefunction"][0]
    assert first_on_second == {
        "type": "reattach",
        "previous_worker_id": "w1",
        "reattach_token": "token-of-w1",
    }
    assert not any(m["type"] == "reattach" for m in received[0])


@attrs.define
class DemoTriggers:
    """A trigger type provided in-process by the remote engine; it fires on demand."""

    engine: Engine
    active: dict[str, LogicalTrigger] = attrs.field(factory=dict)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        if trigger.config == {"refuse": True}:
            raise TriggerRegistrationError("demo refuses this config")
        self.active[trigger.id] = trigger
        self.changed.set()

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        self.active.pop(trigger.id, None)
        self.changed.set()

    async def wait(self, count: int) -> None:
        with trio.fail_after(10):
            while len(self.active) != count:
                await self.changed.wait()
                self.changed = trio.Event()

    async def fire(self, data: Any) -> list[Any]:
        return [
            await self.engine.invoke(trigger.function_id, data)
            for trigger in list(self.active.values())
        ]


class _Watch(logging.Handler):
    def __init__(self, needle: str, event: trio.Event):
        super().__init__()
        self.needle, self.event = needle, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


async def test_triggers_are_registered_again_on_every_connection() -> None:
    refused = trio.Event()
    watch = _Watch("refused trigger t2", refused)
    logging.getLogger("iii.link").addHandler(watch)
    try:
        await _triggers_again(refused)
    finally:
        logging.getLogger("iii.link").removeHandler(watch)


async def _triggers_again(refused: trio.Event) -> None:
    port = free_port()
    fired: list[Any] = []
    config = LinkConfig(url=f"ws://127.0.0.1:{port}", name="test-link", **FAST)
    async with running_link(config) as link:

        async def on_demo(data: Any, trace: TraceContext) -> Any:
            fired.append(data)
            return "seen"

        link.expose("link::on_demo", on_demo)
        link.register_trigger("t1", "demo", "link::on_demo", {"topic": "a"})
        for generation in range(2):
            async with open_test_engine(remote_config(port)) as remote:
                demo = DemoTriggers(remote)
                remote.register_trigger_type("demo", demo)
                assert await link.wait_connected(10)
                await demo.wait(1)
                assert await demo.fire(generation) == ["seen"]
                assert fired[-1] == generation
                if generation == 0:
                    # Refused by the remote: logged, and the link stays up.
                    link.register_trigger("t2", "demo", "link::on_demo", {"refuse": True})
                    link.unregister_trigger("t1")
                    await demo.wait(0)
                    with trio.fail_after(10):
                        await refused.wait()
                    link.unregister_trigger("t2")
                    link.register_trigger("t1", "demo", "link::on_demo", {"topic": "a"})
                    await demo.wait(1)
                    assert link.connected
                remote.request_shutdown()
            assert await link.wait_disconnected(10)


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_TEST_BRIDGE_TOKEN", TOKEN)


async def test_auth_token_is_sent_and_a_refused_link_stays_down(token_env: None) -> None:
    config = remote_config(auth={"tokens": [{"name": "bridge", "env": "III_TEST_BRIDGE_TOKEN"}]})
    async with open_test_engine(config) as remote:
        async with running_link(link_to(remote, token=TOKEN)) as link:
            assert await link.wait_connected(10)
        async with running_link(link_to(remote, token="wrong-token-0123456789")) as refused:
            assert await refused.wait_failed_attempts(2, 10)
            assert not refused.connected
            assert "401" in (refused.statistics().last_error or "")
            with pytest.raises(IIIError) as down:
                await refused.call("demo::echo", {}, timeout_s=60)
            assert down.value.code == "bridge_unavailable"
            assert "401" in down.value.message


async def test_wss_with_a_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {name: str(tmp_path / f"{name}.pem") for name in ("cert", "key", "ca")}
    cert.private_key_and_cert_chain_pem.write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["ca"])
    config = remote_config(tls={"cert": files["cert"], "key": files["key"]})
    async with open_test_engine(config) as remote:

        async def echo(data: Any, ctx: CallContext) -> Any:
            return data

        remote.register_function("demo::echo", echo)
        url = f"wss://localhost:{remote.listen_port}"
        async with running_link(LinkConfig(url=url, ca_file=files["ca"], **FAST)) as link:
            assert await link.wait_connected(10)
            assert await link.call("demo::echo", "tls", timeout_s=10) == "tls"
        # Without the CA file the system store does not trust it.
        async with running_link(LinkConfig(url=url, **FAST)) as untrusted:
            assert await untrusted.wait_failed_attempts(1, 10)
            assert "certificate" in (untrusted.statistics().last_error or "")


# -- hostile remotes ---------------------------------------------------------------------------

Behaviour = Callable[[WebSocketConnection, dict[str, Any]], Awaitable[None]]


@asynccontextmanager
async def fake_remote(
    behaviour: Behaviour,
) -> AsyncIterator[tuple[int, list[int], list[list[dict[str, Any]]]]]:
    """A WebSocket server that greets, answers the link's setup calls, then runs ``behaviour``
    on each call the link makes.  Yields its port, the connections seen, and the messages
    each connection received."""
    connections: list[int] = []
    received: list[list[dict[str, Any]]] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        connections.append(1)
        messages: list[dict[str, Any]] = []
        received.append(messages)
        worker_id = f"w{len(connections)}"
        await ws.send_message(
            orjson.dumps(
                {
                    "type": "workerregistered",
                    "worker_id": worker_id,
                    "reattach_token": f"token-of-{worker_id}",
                }
            ).decode()
        )
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed:
                return
            message = orjson.loads(frame)
            messages.append(message)
            if message.get("type") != "invokefunction" or "invocation_id" not in message:
                continue
            if message["function_id"] == "engine::workers::register":
                await ws.send_message(
                    orjson.dumps(
                        {
                            "type": "invocationresult",
                            "invocation_id": message["invocation_id"],
                            "function_id": message["function_id"],
                            "result": None,
                        }
                    ).decode()
                )
                continue
            try:
                await behaviour(ws, message)
            except ConnectionClosed:
                return

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, ssl_context=None, task_status=task_status
            )
        )
        yield server.port, connections, received
        nursery.cancel_scope.cancel()


def result_for(message: dict[str, Any], result: Any) -> str:
    return orjson.dumps(
        {
            "type": "invocationresult",
            "invocation_id": message["invocation_id"],
            "function_id": message["function_id"],
            "result": result,
        }
    ).decode()


async def test_hostile_remote_garbage_is_skipped_and_a_bad_answer_fails_its_call() -> None:
    async def garbage_then_answer(ws: WebSocketConnection, message: dict[str, Any]) -> None:
        for frame in ("not json", "[1,2]", '{"type":"nonsense"}', "\x1b]0;pwned\x07", b"\xff\xfe"):
            await ws.send_message(frame)
        if message["data"] == "bad":
            # An answer to this very call that cannot be decoded.
            await ws.send_message(
                orjson.dumps(
                    {"type": "invocationresult", "invocation_id": message["invocation_id"],
                     "function_id": 7}
                ).decode()
            )  # fmt: skip
        else:
            await ws.send_message(result_for(message, "fine"))

    async with fake_remote(garbage_then_answer) as (port, connections, _):
        async with running_link(LinkConfig(url=f"ws://127.0.0.1:{port}", **FAST)) as link:
            assert await link.wait_connected(10)
            assert await link.call("x", "good", timeout_s=10) == "fine"
            with pytest.raises(IIIError) as bad:
                await link.call("x", "bad", timeout_s=60)
            assert bad.value.code == "deserialization_error"
            assert await link.call("x", "good", timeout_s=10) == "fine"
            assert len(connections) == 1  # garbage never cost the connection


async def test_hostile_remote_huge_frame_drops_the_connection_only() -> None:
    async def huge(ws: WebSocketConnection, message: dict[str, Any]) -> None:
        if message["data"] == "huge":
            await ws.send_message(result_for(message, "x" * 300_000))
        else:
            await ws.send_message(result_for(message, "small"))

    async with fake_remote(huge) as (port, connections, _):
        config = LinkConfig(url=f"ws://127.0.0.1:{port}", max_message_size=100_000, **FAST)
        async with running_link(config) as link:
            assert await link.wait_connected(10)
            with pytest.raises(IIIError) as stopped:
                await link.call("x", "huge", timeout_s=60)
            assert stopped.value.code == "invocation_stopped"
            assert "1009" in stopped.value.message
            assert await link.wait_connected(10)
            assert await link.call("x", "small", timeout_s=10) == "small"
            assert len(connections) == 2
            # Our own too-large call is refused before it is sent.
            with pytest.raises(IIIError) as too_large:
                await link.call("x", "y" * 200_000, timeout_s=10)
            assert too_large.value.code == "payload_too_large"


async def test_hostile_remote_that_never_answers_times_out_and_closing_mid_call_stops() -> None:
    async def silent_or_close(ws: WebSocketConnection, message: dict[str, Any]) -> None:
        if message["data"] == "close":
            await ws.aclose(code=1011, reason="going away mid-call")

    async with fake_remote(silent_or_close) as (port, connections, _):
        async with running_link(LinkConfig(url=f"ws://127.0.0.1:{port}", **FAST)) as link:
            assert await link.wait_connected(10)
            with pytest.raises(IIIError) as timed_out:
                await link.call("x", "silent", timeout_s=0.2)
            assert timed_out.value.code == "timeout"
            assert link.statistics().calls_in_flight == 0
            with pytest.raises(IIIError) as stopped:
                await link.call("x", "close", timeout_s=60)
            assert stopped.value.code == "invocation_stopped"
            assert await link.wait_connected(10)
            assert len(connections) == 2


async def test_hostile_remote_that_never_greets_is_bounded_by_connect_timeout() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await trio.sleep_forever()
        del ws

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, ssl_context=None, task_status=task_status
            )
        )
        config = LinkConfig(
            url=f"ws://127.0.0.1:{server.port}", **{**FAST, "connect_timeout_s": 0.2}
        )
        async with running_link(config) as link:
            assert await link.wait_failed_attempts(2, 10)
            assert "no answer while connecting" in (link.statistics().last_error or "")
            assert not link.connected
        nursery.cancel_scope.cancel()


async def test_calls_from_the_remote_for_unexposed_functions_and_over_the_limit() -> None:
    async with open_test_engine(remote_config()) as remote:
        release = trio.Event()
        both_running = trio.Event()
        running = 0

        async def slow(data: Any, trace: TraceContext) -> Any:
            nonlocal running
            running += 1
            if running == 2:
                both_running.set()
            await release.wait()
            return data

        async with running_link(link_to(remote, max_concurrent_calls=2)) as link:
            link.expose("link::slow", slow)
            assert await link.wait_connected(10)
            results: list[Any] = []

            async def call(value: int) -> None:
                try:
                    results.append(await remote.invoke("link::slow", value))
                except IIIError as exc:
                    results.append(exc.code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, 1)
                nursery.start_soon(call, 2)
                with trio.fail_after(10):
                    await both_running.wait()
                await call(3)  # refused at once: two already run
                assert results == ["too_many_pending_invocations"]
                release.set()
            assert sorted(results[1:]) == [1, 2]
            # A function the link does not expose is not found.
            link.expose("link::other", slow)
            link.unexpose("link::other")
