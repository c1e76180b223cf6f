"""Issue 10 rows 5, 6 and 14 replayed against a real engine process (``python -m iii serve``).

Hostile workers connect over real sockets with their own tokens: raw
WebSocket clients with an ``Authorization`` header, and an official 0.25 SDK
worker with ``III_TOKEN``.  Each test replays an attack of the issue and
checks that it changes nothing, that the engine keeps serving, and what the
engine logged.  The in-process versions, with the details, are in
``tests/test_grants.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from iii.causation import MAX_TRIGGER_DEPTH
from iii.testing import RawWorker
from tests.support import EngineProcess, reserve_port, start_sdk_worker
from tests.test_grants import bind, register, serve, stream_upgrade
from tests.test_security import raw_worker

SECRETS = {
    "III_H_ADMIN": "hostile-admin-000000000",
    "III_H_SPY": "hostile-spy-00000000000",
    "III_H_PROVIDER": "hostile-provider-000000",
}
ADMIN, SPY, PROVIDER = SECRETS.values()

AUTH = {
    "tokens": [
        {"name": "admin", "env": "III_H_ADMIN"},
        # The attacker of the issue: it may call nothing but its own functions.
        {"name": "spy", "env": "III_H_SPY", "register": ["spy::*"], "invoke": ["spy::*"]},
        {"name": "provider", "env": "III_H_PROVIDER", "register": ["*", "auth::stream"]},
    ]
}


class Hostile:
    """The engine process and its ports."""

    def __init__(self, process: EngineProcess, rest_port: int, stream_port: int):
        self.process = process
        self.rest_port = rest_port
        self.stream_port = stream_port

    @property
    def port(self) -> int:
        return self.process.port

    def log(self) -> str:
        return self.process.log_text()

    def alive(self) -> bool:
        assert self.process.process is not None
        return self.process.process.poll() is None


@asynccontextmanager
async def hostile_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hostile]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    rest_port, stream_port = reserve_port(), reserve_port()
    config = {
        "auth": AUTH,
        "modules": [
            {"class": "modules::state::StateModule"},
            {"class": "modules::queue::QueueModule"},
            {"class": "modules::pubsub::PubSubModule"},
            {
                "class": "modules::observability::OtelModule",
                "config": {"enabled": False, "prometheus_enabled": False},
            },
            {
                "class": "modules::api::RestApiModule",
                "config": {"port": rest_port, "host": "127.0.0.1"},
            },
            {
                "class": "modules::stream::StreamModule",
                "config": {
                    "port": stream_port,
                    "host": "127.0.0.1",
                    "auth_function": "auth::stream",
                },
            },
        ],
    }
    process = EngineProcess.write(tmp_path, config)
    process.start()
    try:
        await process.started()
        yield Hostile(process, rest_port, stream_port)
        assert process.process is not None and process.process.poll() is None, process.log_text()
    finally:
        process.kill()


async def still_serving(engine: Hostile) -> None:
    async with raw_worker(engine.port, ADMIN) as admin:
        answer = await admin.call("state::get", {"scope": "admin", "key": "k0"})
        assert "error" not in answer, answer


async def admin_keys(admin: RawWorker) -> list[Any]:
    answer = await admin.call("state::list", {"scope": "admin"})
    assert "error" not in answer, answer
    return sorted(answer["result"])


# -- row 5 ------------------------------------------------------------------------------


async def test_conditions_outside_the_grant_and_a_self_refiring_trigger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hostile_engine(tmp_path, monkeypatch) as engine:
        calls: list[str] = []

        async def record(data: Any, message: dict[str, Any]) -> Any:
            calls.append(message["function_id"])
            return {"status_code": 200, "body": "secret"}

        async with (
            raw_worker(engine.port, ADMIN) as host,
            raw_worker(engine.port, ADMIN) as admin,
            raw_worker(engine.port, SPY) as spy,
            trio.open_nursery() as nursery,
        ):
            for function_id in ("admin::secret", "admin::watch"):
                assert await register(host, function_id) is None
            nursery.start_soon(serve, host, {"admin::secret": record, "admin::watch": record})
            for key in range(3):
                answer = await admin.call(
                    "state::set", {"scope": "admin", "key": f"k{key}", "value": key}
                )
                assert "error" not in answer
            assert await register(spy, "spy::handler") is None

            # Attack 1: the spy's own HTTP route with the admin's function as its condition.
            refusal = await bind(
                spy,
                "http",
                "spy::handler",
                {"api_path": "/spy", "condition_function_id": "admin::secret"},
            )
            assert refusal is not None and refusal["code"] == "forbidden", refusal
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{engine.rest_port}/spy")
            assert response.status_code == 404

            # Attack 2: state::delete as the condition of its state trigger.
            refusal = await bind(
                spy,
                "state",
                "spy::handler",
                {"scope": "admin", "condition_function_id": "state::delete"},
            )
            assert refusal is not None and refusal["code"] == "forbidden", refusal
            answer = await admin.call("state::set", {"scope": "admin", "key": "k1", "value": 10})
            assert "error" not in answer
            assert await admin_keys(admin) == [0, 2, 10]
            assert calls == []

            # The loop itself, by a token allowed to build it: bounded, then idle.
            assert (
                await bind(
                    admin,
                    "state",
                    "admin::watch",
                    {"scope": "loop", "condition_function_id": "state::delete"},
                )
                is None
            )
            answer = await admin.call("state::set", {"scope": "loop", "key": "k", "value": 1})
            assert "error" not in answer
            with trio.fail_after(30):
                while "nested trigger firings" not in engine.log():
                    await trio.sleep(0.1)
            # The first delete found the value (its handler ran once), the others null.
            with trio.fail_after(10):
                while not calls:
                    await trio.sleep(0.05)
            assert calls == ["admin::watch"]
            assert engine.log().count("nested trigger firings") == 1
            assert f"(limit {MAX_TRIGGER_DEPTH})" in engine.log()
            nursery.cancel_scope.cancel()
        await still_serving(engine)
        log = engine.log()
        assert "may not invoke 'admin::secret'" in log and "may not invoke 'state::delete'" in log


WORKER_SPY_025 = """
import logging, sys
from iii import register_worker, InitOptions

class Refusals(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if "Trigger registration failed" in text:
            print("REFUSED " + text, flush=True)

logging.getLogger().addHandler(Refusals())
iii = register_worker(sys.argv[1], InitOptions(worker_name="spy025", otel={"enabled": False}))
iii.register_function("spy::handler", lambda data: print("CALLED", flush=True))
for trigger in (
    {"type": "state", "function_id": "spy::handler",
     "config": {"scope": "admin", "condition_function_id": "state::delete"}},
    {"type": "subscribe", "function_id": "spy::handler", "config": {"topic": "admin.events"}},
):
    iii.register_trigger(trigger)
print("READY", flush=True)
sys.stdin.readline()
iii.shutdown()
"""


@pytest.mark.sdk
async def test_sdk_025_spy_cannot_bind_a_condition_or_read_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hostile_engine(tmp_path, monkeypatch) as engine:
        async with raw_worker(engine.port, ADMIN) as admin:
            for key in range(3):
                answer = await admin.call(
                    "state::set", {"scope": "admin", "key": f"k{key}", "value": key}
                )
                assert "error" not in answer
            url = f"ws://127.0.0.1:{engine.port}"
            async with start_sdk_worker(
                "0.25.0", WORKER_SPY_025, url=url, env={"III_TOKEN": SPY}
            ) as spy:
                await spy.wait_for("READY", timeout=60)
                first = await spy.wait_for("REFUSED", timeout=30)
                second = await spy.wait_for("REFUSED", timeout=30)
                assert "forbidden" in first + second or "may not" in first + second
                await admin.call("state::set", {"scope": "admin", "key": "k1", "value": 11})
                await admin.call("publish", {"topic": "admin.events", "data": {"card": "4111"}})
                assert await admin_keys(admin) == [0, 2, 11]
                # Nothing can call the spy's handler: neither trigger exists ...
                listed = await admin.call("engine::triggers::list", {})
                assert "error" not in listed and "spy::handler" not in repr(listed), listed
                # ... and it did not run (its whole output, read once it has exited).
                await spy.send_line("")
                with trio.fail_after(30):
                    rest = [line async for line in spy.lines]
                assert [line for line in [*spy.seen, *rest] if line.startswith("CALLED")] == []
        await still_serving(engine)


# -- row 6 ------------------------------------------------------------------------------


async def test_data_triggers_of_a_token_that_cannot_read_the_data_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hostile_engine(tmp_path, monkeypatch) as engine:
        handled: list[str] = []

        async def record(data: Any, message: dict[str, Any]) -> Any:
            handled.append(message["function_id"])
            return None

        async with (
            raw_worker(engine.port, ADMIN) as host,
            raw_worker(engine.port, ADMIN) as admin,
            raw_worker(engine.port, SPY) as spy_host,
            raw_worker(engine.port, SPY) as spy,
            trio.open_nursery() as nursery,
        ):
            assert await register(spy_host, "spy::leak") is None
            assert await register(host, "admin::job") is None
            nursery.start_soon(serve, spy_host, {"spy::leak": record})
            nursery.start_soon(serve, host, {"admin::job": record})
            # The four leaks of the issue: state values, publish data, log entries, queue jobs.
            for trigger_type, config in [
                ("state", {"scope": "admin"}),
                ("subscribe", {"topic": "admin.events"}),
                ("log", {"level": "all"}),
                ("queue", {"topic": "admin.jobs"}),
            ]:
                refusal = await bind(spy, trigger_type, "spy::leak", config)
                assert refusal is not None and refusal["code"] == "forbidden", (
                    trigger_type,
                    refusal,
                )
                assert "may not receive" in refusal["message"]
            # The admin's own consumer of its queue.
            assert await bind(admin, "queue", "admin::job", {"topic": "admin.jobs"}) is None
            for function_id, data in [
                ("state::set", {"scope": "admin", "key": "card", "value": "4111"}),
                ("publish", {"topic": "admin.events", "data": {"card": "4111"}}),
                ("engine::log::info", {"message": "card 4111"}),
                ("enqueue", {"topic": "admin.jobs", "data": {"card": "4111"}}),
            ]:
                answer = await admin.call(function_id, data)
                assert "error" not in answer, (function_id, answer)
            with trio.fail_after(15):
                while "admin::job" not in handled:
                    await trio.sleep(0.05)
            # Nothing can reach the spy later either: it holds no trigger at all
            # (proven from the registry, not by waiting for nothing to arrive).
            listed = await admin.call("engine::triggers::list", {"include_internal": True})
            assert "error" not in listed, listed
            functions = [t["function_id"] for t in listed["result"]["triggers"]]
            assert "admin::job" in functions and "spy::leak" not in functions, functions
            assert handled == ["admin::job"]  # the job went to its owner, nothing to the spy
            nursery.cancel_scope.cancel()
        await still_serving(engine)


# -- row 14 -----------------------------------------------------------------------------


async def test_stream_auth_fails_closed_and_cannot_be_replicated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hostile_engine(tmp_path, monkeypatch) as engine:
        # Absent.
        assert await stream_upgrade(engine.stream_port, "client-secret-value") == 401
        mode = "error"

        async def auth(data: Any, message: dict[str, Any]) -> Any:
            if mode == "error":
                raise RuntimeError("denied")
            if mode == "hang":
                await trio.sleep_forever()
            return {"null": None, "string": "ok", "ok": {"context": {"user": "u1"}}}[mode]

        async with (
            raw_worker(engine.port, PROVIDER) as provider,
            raw_worker(engine.port, ADMIN) as admin,
            raw_worker(engine.port, SPY) as spy,
            trio.open_nursery() as nursery,
        ):
            # The replica attack: neither the spy nor the admin's bare "*" names it.
            assert await register(spy, "auth::stream") == "FORBIDDEN"
            assert await register(admin, "auth::stream") == "FORBIDDEN"
            assert await register(admin, "stream::get(admin)") == "FORBIDDEN"
            assert await register(provider, "auth::stream") is None
            nursery.start_soon(serve, provider, {"auth::stream": auth})
            for mode in ("error", "null", "string", "hang"):
                assert await stream_upgrade(engine.stream_port, "client-secret-value") == 401, mode
            mode = "ok"
            assert await stream_upgrade(engine.stream_port, "client-secret-value") == 101
            nursery.cancel_scope.cancel()
        log = engine.log()
        assert log.count("refused (401)") == 5
        for reason in ("function_not_found", "'failed'", "null", "str", "no answer within 5s"):
            assert reason in log, reason
        assert "client-secret-value" not in log
        await still_serving(engine)


WORKER_ECHO_025 = """
import sys
from iii import register_worker, InitOptions

iii = register_worker(sys.argv[1], InitOptions(worker_name="echo025", otel={"enabled": False}))
runs = 0

def echo(data):
    global runs
    runs += 1
    print("RUN %d" % runs, flush=True)
    if runs < 40:  # a guard for the test, should the engine not cut the chain
        iii.trigger({"function_id": "state::set",
                     "payload": {"scope": "echo", "key": "k", "value": runs}})
    return None

iii.register_function("echo::write_back", echo)
iii.register_trigger({"type": "state", "function_id": "echo::write_back", "config": {"scope": "echo"}})
print("READY", flush=True)
sys.stdin.readline()
iii.shutdown()
"""


@pytest.mark.sdk
async def test_sdk_025_handler_writing_what_it_watches_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain through a worker: the 0.25 SDK passes the invocation's trace
    context on to the calls its handler makes, which is how the engine follows it."""
    async with hostile_engine(tmp_path, monkeypatch) as engine:
        url = f"ws://127.0.0.1:{engine.port}"
        async with start_sdk_worker(
            "0.25.0", WORKER_ECHO_025, url=url, env={"III_TOKEN": ADMIN}
        ) as w:
            await w.wait_for("READY", timeout=60)
            async with raw_worker(engine.port, ADMIN) as admin:
                with trio.fail_after(30):  # the SDK registers its trigger after READY
                    while "echo::write_back" not in repr(
                        await admin.call("engine::triggers::list", {})
                    ):
                        await trio.sleep(0.1)
                answer = await admin.call("state::set", {"scope": "echo", "key": "k", "value": 0})
                assert "error" not in answer
                with trio.fail_after(60):
                    while "nested trigger firings" not in engine.log():
                        await trio.sleep(0.1)
            # Every run printed its line before the call that fired the next, so
            # all of them are in the pipe by now; the script exits on a line.
            await w.send_line("")
            with trio.fail_after(30):
                rest = [line async for line in w.lines]
            runs = [int(line.split()[1]) for line in [*w.seen, *rest] if line.startswith("RUN ")]
            assert runs == list(range(1, MAX_TRIGGER_DEPTH + 1)), runs
        await still_serving(engine)
