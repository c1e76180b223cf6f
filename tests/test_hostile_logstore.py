"""Follow-up to issue 10 rows 7 and 9, replayed against a real engine process.

Each test runs ``python -m iii serve`` (:class:`tests.support.EngineProcess`)
with its default limits and attacks it over real sockets with raw WebSocket
clients: a worker whose token forbids what it asks for, asking 1,000 times
for each kind of thing, adds a bounded number of lines to the engine's log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import wrap_client_stream

from iii.testing import RawWorker
from tests.support import EngineProcess

MiB = 1024 * 1024

OBSERVABILITY = {
    "class": "modules::observability::OtelModule",
    "config": {"enabled": True, "exporter": "memory", "prometheus_enabled": False},
}

TOKEN_LIMITED = "limited-token-0123456789abcdef"
AUTH = {
    "tokens": [
        {
            "name": "limited",
            "env": "III_TEST_TOKEN_LIMITED",
            "register": ["mine::*"],
            "invoke": ["mine::*"],
            "trigger_types": ["hook"],
        }
    ]
}


@pytest.fixture(autouse=True)
def _info_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_LOG_LEVEL", "info")
    monkeypatch.setenv("III_TEST_TOKEN_LIMITED", TOKEN_LIMITED)


@asynccontextmanager
async def running_engine(directory: Path, config: dict[str, Any]) -> AsyncIterator[EngineProcess]:
    engine = EngineProcess.write(directory, config)
    engine.start()
    try:
        await engine.started()
        yield engine
    finally:
        engine.kill()


@asynccontextmanager
async def raw_worker(
    port: int, path: str = "/", token: str | None = None
) -> AsyncIterator[RawWorker]:
    """A raw worker (big frames both ways) on a socket this helper owns and always closes."""
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            "127.0.0.1",
            path,
            extra_headers=headers,
            message_queue_size=64,
            max_message_size=64 * MiB,
        )
        worker = RawWorker(ws)
        if path == "/":
            registered = await worker.receive(timeout=10)
            assert registered["type"] == "workerregistered"
            worker.worker_id = registered["worker_id"]
        try:
            yield worker
        finally:
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def wait_for_log(engine: EngineProcess, predicate: Any, timeout: float = 20) -> str:
    with trio.fail_after(timeout):
        while True:
            text = engine.log_text()
            if predicate(text):
                return text
            await trio.sleep(0.1)


async def still_serves(engine: EngineProcess, token: str | None = None) -> None:
    async with raw_worker(engine.port, token=token) as worker:
        await worker.send({"type": "ping"})
        assert (await worker.receive_type("pong", timeout=10)) == {"type": "pong"}


# -- refusals under auth.tokens ---------------------------------------------------------------------


def forbidden(i: int) -> list[dict[str, Any]]:
    """One of each request the limited token may not make."""
    return [
        {"type": "registerfunction", "id": f"admin::f{i}"},
        {"type": "registertriggertype", "id": f"sneaky{i}", "description": "x"},
        {
            "type": "registertrigger",
            "id": f"t{i}",
            "trigger_type": "log",
            "function_id": "mine::f",
            "config": {},
        },
        {
            "type": "invokefunction",
            "function_id": f"admin::secret{i}",
            "data": {},
            "invocation_id": f"00000000-0000-4000-8000-{i:012d}",
        },
        {
            "type": "invokefunction",
            "function_id": f"admin::secret{i}",
            "data": {},
            "action": {"type": "void"},
        },
    ]


async def test_forbidden_requests_add_a_bounded_number_of_log_lines(tmp_path: Path) -> None:
    count = 1000
    config = {"modules": [OBSERVABILITY], "auth": AUTH}
    async with running_engine(tmp_path, config) as engine:
        await still_serves(engine, TOKEN_LIMITED)
        text = await wait_for_log(engine, lambda t: "disconnected" in t)
        before = len(text)
        async with raw_worker(engine.port, token=TOKEN_LIMITED) as worker:

            async def attack() -> None:
                for i in range(count):
                    for message in forbidden(i):
                        await worker.send(message)

            # Every refusal is still answered (read while sending: a worker
            # that does not read its answers is dropped as a slow consumer).
            answers = dict.fromkeys(
                ("registrationrejected", "invocationresult", "triggerregistrationresult"), 0
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                with trio.fail_after(60):
                    while min(answers.values()) < count:
                        kind = (await worker.receive(timeout=30))["type"]
                        answers[kind] = answers.get(kind, 0) + 1
        await still_serves(engine, TOKEN_LIMITED)
        # Both workers' disconnections are logged after the line for what was held back.
        text = await wait_for_log(engine, lambda t: t[before:].count("disconnected") >= 2)
        lines = text[before:].splitlines()

    refusal_lines = [line for line in lines if "refused" in line or "may not" in line]
    # The first few refusals, then at most one per interval (the test is shorter),
    # and at the close one line for those held back.
    assert len(refusal_lines) <= 10, "\n".join(refusal_lines)
    assert sum("were not logged" in line for line in lines) == 1, "\n".join(lines[-20:])
    assert len(lines) <= 40, "\n".join(lines[:60])
