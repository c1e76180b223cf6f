"""Helpers for the client-command tests: run ``python -m iii <command>`` as users do,
and a raw worker over a real socket that serves functions while the command runs.

* :func:`run_cli` runs the command line in a subprocess (no ``III_URL``,
  ``III_TOKEN`` or ``SSL_CERT_FILE`` leak in from the test's environment) and
  returns its exit code, stdout and stderr.
* :func:`serving_worker` connects a raw protocol worker, registers functions
  (and triggers), waits until the engine has filed them, and answers every
  call with what the test's handler returns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from iii.testing import RawWorker
from tests.support import ROOT

__all__ = ["CliResult", "run_cli", "serving_worker", "ServingWorker", "NO_ANSWER"]

# No command run here takes this long (their own --timeout is shorter).
RUN_TIMEOUT = 60.0
# A handler's answer that means: never answer this call.
NO_ANSWER: Any = object()
Handler = Callable[[Any], Awaitable[Any]]


@attrs.frozen
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return orjson.loads(self.stdout)


async def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: bytes = b"",
) -> CliResult:
    """``python -m iii *args``; its output is decoded as UTF-8 (invalid bytes replaced)."""
    child_env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("III_URL", "III_TOKEN", "SSL_CERT_FILE", "SSL_CERT_DIR")
    }
    child_env["PYTHONPATH"] = str(ROOT)
    child_env.update(env or {})
    with trio.fail_after(RUN_TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-m", "iii", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_env,
            cwd=ROOT,
        )
    return CliResult(
        done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    )


@attrs.define(eq=False)
class ServingWorker:
    raw: RawWorker
    calls: list[tuple[str, Any]] = attrs.field(factory=list)
    called: trio.Event = attrs.field(factory=trio.Event)


@asynccontextmanager
async def serving_worker(
    port: int,
    functions: Mapping[str, Handler],
    *,
    triggers: Sequence[Mapping[str, Any]] = (),
    descriptions: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> AsyncIterator[ServingWorker]:
    """A raw worker serving ``functions`` on the engine at ``127.0.0.1:port``.

    Each handler gets the call's ``data`` and returns the ``invocationresult``
    fields to send (``{"result": …}`` or ``{"error": …}``), or :data:`NO_ANSWER`.
    The socket is this helper's own and always closed (trio-websocket leaves a
    client socket open when the server closes first).
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, "127.0.0.1", "/", max_message_size=64 * 1024 * 1024
        )
        raw = RawWorker(ws)
        registered = await raw.receive(timeout=10)
        assert registered["type"] == "workerregistered", registered
        raw.worker_id = registered["worker_id"]
        for function_id in functions:
            description = (descriptions or {}).get(function_id)
            message = {"type": "registerfunction", "id": function_id}
            if description is not None:
                message["description"] = description
            await raw.send(message)
        for trigger in triggers:
            await raw.send({"type": "registertrigger", **trigger})
        if metadata is not None:
            answer = await raw.call("engine::workers::register", dict(metadata), timeout=10)
            assert "error" not in answer, answer
        # Messages of one connection are handled in order: this answer comes
        # after every registration above was filed.
        barrier = await raw.call("engine::functions::list", {}, timeout=10)
        assert "error" not in barrier, barrier
        worker = ServingWorker(raw)

        async def answer(message: dict[str, Any]) -> None:
            handler = functions[message["function_id"]]
            reply = await handler(message.get("data"))
            if reply is NO_ANSWER:
                return
            await raw.send(
                {
                    "type": "invocationresult",
                    "invocation_id": message["invocation_id"],
                    "function_id": message["function_id"],
                    **reply,
                }
            )

        async def serve() -> None:
            try:
                while True:
                    message = orjson.loads(await ws.get_message())
                    if message.get("type") != "invokefunction":
                        continue
                    worker.calls.append((message["function_id"], message.get("data")))
                    worker.called.set()
                    nursery.start_soon(answer, message)
            except ConnectionClosed:
                return

        nursery.start_soon(serve)
        try:
            yield worker
        finally:
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()
