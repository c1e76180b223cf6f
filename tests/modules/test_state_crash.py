"""kill -9 during a write burst: every acknowledged write to the file store is there
after a restart (a real engine process, a raw WebSocket client)."""

from __future__ import annotations

import uuid

import orjson
import trio
from trio_websocket import ConnectionClosed, open_websocket, wrap_client_stream

from tests.support import EngineProcess

WRITERS = 16
KILL_AFTER = 400


async def write_burst(url_port: int, acknowledged: dict[str, int], enough: trio.Event) -> None:
    """Many concurrent state::set calls; records those the engine acknowledged."""
    # Our own TCP stream, closed by us: trio-websocket leaves the socket of a
    # connection that the peer reset unclosed.
    stream = await trio.open_tcp_stream("127.0.0.1", url_port)
    async with stream, trio.open_nursery() as ws_nursery:
        ws = await wrap_client_stream(ws_nursery, stream, "127.0.0.1", "/")
        await ws.get_message()  # workerregistered
        pending: dict[str, tuple[str, int]] = {}
        counter = 0

        async def send_more() -> None:
            nonlocal counter
            counter += 1
            invocation_id = str(uuid.uuid4())
            key = f"k{counter % 300}"
            pending[invocation_id] = (key, counter)
            await ws.send_message(
                orjson.dumps(
                    {
                        "type": "invokefunction",
                        "function_id": "state::set",
                        "invocation_id": invocation_id,
                        "data": {"scope": "crash", "key": key, "value": {"n": counter}},
                    }
                ).decode()
            )

        for _ in range(WRITERS):
            await send_more()
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed:
                ws_nursery.cancel_scope.cancel()
                return  # the engine was killed
            message = orjson.loads(frame)
            if message.get("type") != "invocationresult":
                continue
            key, n = pending.pop(message["invocation_id"])
            assert "error" not in message, message
            # the highest acknowledged value per key is what must survive
            acknowledged[key] = max(acknowledged.get(key, 0), n)
            if counter >= KILL_AFTER:
                enough.set()
            try:
                await send_more()
            except ConnectionClosed:
                ws_nursery.cancel_scope.cancel()
                return


async def test_no_acknowledged_write_is_lost_on_kill_9(tmp_path):
    store = tmp_path / "state-store"
    engine = EngineProcess.write(
        tmp_path,
        {
            "modules": [
                {
                    "class": "modules::state::StateModule",
                    "config": {
                        "adapter": {
                            "class": "modules::state::adapters::KvStore",
                            "config": {"store_method": "file_based", "file_path": str(store)},
                        }
                    },
                }
            ]
        },
    )
    engine.start()
    acknowledged: dict[str, int] = {}
    try:
        await engine.started()
        enough = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_burst, engine.port, acknowledged, enough)
            with trio.fail_after(60):
                await enough.wait()
            engine.kill()  # SIGKILL with writes in flight
            with trio.fail_after(10):
                while nursery.child_tasks:
                    await trio.sleep(0.05)
        assert len(acknowledged) > 100

        engine.start()
        await engine.started()
        async with open_websocket("127.0.0.1", engine.port, "/", use_ssl=False) as ws:
            await ws.get_message()
            invocation_id = str(uuid.uuid4())
            await ws.send_message(
                orjson.dumps(
                    {
                        "type": "invokefunction",
                        "function_id": "state::list",
                        "invocation_id": invocation_id,
                        "data": {"scope": "crash"},
                    }
                ).decode()
            )
            with trio.fail_after(10):
                reply = orjson.loads(await ws.get_message())
        values = reply["result"]
        # every key's stored value is at least its highest acknowledged write
        stored_max = max(v["n"] for v in values)
        assert stored_max >= max(acknowledged.values())
        by_key = {}
        for value in values:
            by_key.setdefault(f"k{value['n'] % 300}", value["n"])
        for key, n in acknowledged.items():
            assert by_key.get(key, 0) >= n, (key, n, by_key.get(key))
    finally:
        engine.kill()
