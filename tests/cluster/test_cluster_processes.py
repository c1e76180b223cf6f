"""Real engine processes on one Redis with official SDK workers on different engines, and kill -9."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from iii.client import ClientError
from iii.testing import RawWorker
from tests.cluster.processes import (
    call,
    engine_processes,
    http_status,
    wait_cluster_size,
    wait_function,
)
from tests.sdk_workers import SCRIPTS, command
from tests.support import start_node_worker, start_sdk_worker

pytestmark = [pytest.mark.sdk, pytest.mark.services]

NODE_WORKER = r"""
import { registerWorker } from 'iii-sdk'
import readline from 'node:readline'

const iii = registerWorker(process.argv[2], { workerName: 'node-worker' })
iii.registerFunction('node::echo', async (input) => {
  console.log('CALLED node::echo ' + JSON.stringify(input))
  return { echo: input, by: 'node' }
})
console.log('READY')
const lines = readline.createInterface({ input: process.stdin })
for await (const line of lines) {
  const cmd = JSON.parse(line)
  try {
    const out = await iii.trigger({ function_id: cmd.fn, payload: cmd.data })
    console.log('OK ' + JSON.stringify(out))
  } catch (e) {
    console.log('ERR ' + JSON.stringify({ code: e.code ?? null, message: String(e.message ?? e) }))
  }
}
process.exit(0)
"""


async def test_sdk_workers_on_three_engines_call_each_other(tmp_path: Path) -> None:
    async with engine_processes(tmp_path, 3) as (a, b, c):
        async with (
            start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=b.url) as w041,
            start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=c.url) as w025,
            start_node_worker(NODE_WORKER, url=a.url) as node,
        ):
            for worker in (w041, w025, node):
                await worker.wait_for("READY", timeout=60)
            assert await command(w041, op="register", id="p::from041") == ("OK", None)
            assert await command(w025, op="register", id="p::from025") == ("OK", None)
            for engine in (a, b, c):
                for function_id in ("p::from041", "p::from025", "node::echo"):
                    await wait_function(engine, function_id)
            # 0.25.0 on C calls 0.4.1 on B and Node on A; 0.4.1 on B calls 0.25.0 on C.
            status, value = await command(w025, op="call", fn="p::from041", data={"n": 1})
            assert (status, value["by"], value["echo"]["n"]) == ("OK", "0.4.1", 1)
            status, value = await command(w025, op="call", fn="node::echo", data={"n": 2})
            assert (status, value["by"]) == ("OK", "node")
            status, value = await command(w041, op="call", fn="p::from025", data={"n": 3})
            assert (status, value["by"]) == ("OK", "0.25.0")
            status, value = await node.request('{"fn": "p::from041", "data": {"n": 4}}')
            assert status == "OK" and '"0.4.1"' in value
            # SDK parsers accept the cluster-wide lists (with their added "engine" fields).
            status, listed = await command(w041, op="functions")
            assert status == "OK" and {"p::from041", "p::from025", "node::echo"} <= set(listed)
            status, listed = await command(w025, op="functions")
            assert status == "OK" and {"p::from041", "p::from025", "node::echo"} <= set(listed)
            status, workers = await command(w041, op="workers")
            assert status == "OK" and {"w041", "w025", "node-worker"} <= {
                w["name"] for w in workers
            }


async def serve_route(port: int, *, task_status: trio.TaskStatus[None]) -> None:
    """A raw worker on ``port`` with ``p::route`` behind ``GET /kill9``, until
    its engine dies (on a socket it owns and always closes)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/")
        worker = RawWorker(ws)
        try:
            await worker.receive_type("workerregistered", timeout=10)
            await worker.send({"type": "registerfunction", "id": "p::route"})
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": "kill9-route",
                    "trigger_type": "http",
                    "function_id": "p::route",
                    "config": {"api_path": "kill9", "http_method": "GET"},
                }
            )
            task_status.started()
            while True:
                message = await worker.receive_type("invokefunction", timeout=3600)
                await worker.send(
                    {
                        "type": "invocationresult",
                        "invocation_id": message["invocation_id"],
                        "function_id": "p::route",
                        "result": {"status_code": 200, "body": {"ok": True}},
                    }
                )
        except ConnectionClosed:
            pass
        finally:
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def test_kill_9_of_an_engine_stops_its_calls_and_its_functions_vanish(tmp_path: Path) -> None:
    async with engine_processes(tmp_path, 3) as (a, b, c):
        async with (
            start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=b.url) as on_b,
            start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=a.url) as on_a,
            trio.open_nursery() as route_nursery,
        ):
            await route_nursery.start(serve_route, b.port)
            await on_b.wait_for("READY", timeout=60)
            await on_a.wait_for("READY", timeout=60)
            assert await command(on_b, op="register", id="p::slow", kind="slow") == ("OK", None)
            assert await command(on_b, op="register", id="p::echo") == ("OK", None)
            await wait_function(a, "p::slow")
            await wait_function(c, "p::echo")
            for engine in (a, c):
                assert await http_status(engine, "/kill9", until=200) == 200
            async with trio.open_nursery() as nursery:
                answers: list[tuple[str, object]] = []
                errors: list[str] = []

                async def slow_call() -> None:
                    answers.append(
                        await command(on_a, op="call", fn="p::slow", data={}, timeout=30)
                    )

                async def slow_call_on_c() -> None:
                    with pytest.raises(ClientError) as info:
                        await call(c, "p::slow", {}, timeout=30)
                    errors.append(info.value.message)

                nursery.start_soon(slow_call)
                await on_b.wait_for("CALLED p::slow", timeout=30)
                nursery.start_soon(slow_call_on_c)
                await on_b.wait_for("CALLED p::slow", timeout=30)
                b.kill()  # SIGKILL
            # Both calls in flight end invocation_stopped, through A and through C.
            ((status, error),) = answers
            assert status == "ERR" and error["code"] == "invocation_stopped", error  # type: ignore[index]
            (message,) = errors
            assert "invocation_stopped" in message, message
            for engine in (a, c):
                await wait_function(engine, "p::echo", present=False)
                assert await http_status(engine, "/kill9", until=404) == 404
            with pytest.raises(Exception, match="function_not_found"):
                await call(c, "p::echo", {})
            # B comes back; its worker reconnects by itself and everything works again.
            b.start()
            await b.started(timeout=60)
            await wait_cluster_size([a, b, c], 3)
            await wait_function(c, "p::echo", timeout=60)
            assert (await call(c, "p::echo", {"again": True}))["echo"]["again"] is True


async def test_a_hung_engine_is_dropped_within_dead_after_and_rejoins_when_it_resumes(
    tmp_path: Path,
) -> None:
    """SIGSTOP: no socket closes; the record expires and the links' pings go unanswered."""
    import os
    import signal

    async with engine_processes(tmp_path, 2, dead_after_ms=1500) as (a, b):
        async with (
            start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=b.url) as on_b,
            start_sdk_worker("0.25.0", SCRIPTS["0.25.0"], url=a.url) as on_a,
        ):
            await on_b.wait_for("READY", timeout=60)
            await on_a.wait_for("READY", timeout=60)
            assert await command(on_b, op="register", id="p::hang", kind="slow") == ("OK", None)
            assert await command(on_b, op="register", id="p::back") == ("OK", None)
            await wait_function(a, "p::hang")
            assert b.process is not None
            async with trio.open_nursery() as nursery:
                answers: list[tuple[str, object]] = []

                async def hung_call() -> None:
                    answers.append(
                        await command(on_a, op="call", fn="p::hang", data={}, timeout=30)
                    )

                nursery.start_soon(hung_call)
                await on_b.wait_for("CALLED p::hang", timeout=30)
                os.kill(b.process.pid, signal.SIGSTOP)
            try:
                ((status, error),) = answers
                assert status == "ERR" and error["code"] == "invocation_stopped", error  # type: ignore[index]
                await wait_function(a, "p::back", present=False)
            finally:
                os.kill(b.process.pid, signal.SIGCONT)
            # Resumed: it heartbeats again, the links come back, its functions too.
            await wait_function(a, "p::back", timeout=60)
            assert (await call(a, "p::back", {"x": 1}))["echo"]["x"] == 1
