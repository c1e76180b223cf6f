"""What the Bridge adapter tests share: three engines on loopback.

A **backend** (a real ``python -m iii serve`` process, so that it can be
killed and restarted) runs State and Stream on KvStore, PubSub, the KV server
and a file-based builtin queue; **bridge** engines (in the test's process)
run State, Stream and Queue on the Bridge adapters pointed at the backend.
Raw workers reach the backend over loopback to read what the bridge stored.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket

from iii.testing import RawWorker, make_config
from tests.support import EngineProcess, free_port

__all__ = [
    "backend_config",
    "bridge_config",
    "backend_process",
    "raw_worker_at",
    "ok",
    "until_ok",
    "wait_for",
    "connected",
    "answer_jobs",
    "topic_stats",
    "called",
]


def backend_config(queue_dir: Path, port: int | None = None) -> dict[str, Any]:
    return {
        "port": port or free_port(),
        "shutdown_grace_ms": 1000,
        "modules": [
            {"class": "modules::state::StateModule"},
            {
                "class": "modules::stream::StreamModule",
                "config": {"port": free_port(), "host": "127.0.0.1"},
            },
            {"class": "modules::pubsub::PubSubModule"},
            {"class": "modules::kv_server::KvServer"},
            {
                "class": "modules::queue::QueueModule",
                "config": {
                    "adapter": {
                        "class": "modules::queue::BuiltinQueueAdapter",
                        "config": {
                            "store_method": "file_based",
                            "file_path": str(queue_dir),
                            "backoff_ms": 50,
                        },
                    }
                },
            },
        ],
    }


def bridge_config(url: str, *, queue: bool = True, **adapter_keys: Any):
    bridge = {"bridge_url": url, **adapter_keys}
    modules: list[dict[str, Any]] = [
        {
            "class": "modules::state::StateModule",
            "config": {"adapter": {"class": "modules::state::adapters::Bridge", "config": bridge}},
        },
        {
            "class": "modules::stream::StreamModule",
            "config": {
                "port": 0,
                "host": "127.0.0.1",
                "adapter": {"class": "modules::stream::adapters::Bridge", "config": bridge},
            },
        },
    ]
    if queue:
        modules.append(
            {
                "class": "modules::queue::QueueModule",
                "config": {
                    "adapter": {"class": "modules::queue::adapters::Bridge", "config": bridge}
                },
            }
        )
    return make_config(modules)


@asynccontextmanager
async def backend_process(tmp_path: Path) -> AsyncIterator[EngineProcess]:
    (tmp_path / "queue").mkdir(exist_ok=True)
    backend = EngineProcess.write(tmp_path, backend_config(tmp_path / "queue"))
    backend.start()
    try:
        await backend.started()
        yield backend
    finally:
        backend.kill()


@asynccontextmanager
async def raw_worker_at(port: int) -> AsyncIterator[RawWorker]:
    """A raw worker over loopback to an engine we only know by its port."""
    async with open_websocket("127.0.0.1", port, "/", use_ssl=False) as ws:
        worker = RawWorker(ws)
        registered = await worker.receive(timeout=10)
        worker.worker_id = registered["worker_id"]
        yield worker


def ok(reply: dict[str, Any]) -> Any:
    assert "error" not in reply, reply
    return reply.get("result")


async def until_ok(worker: RawWorker, function_id: str, data: Any, timeout: float = 30) -> Any:
    """Call until the answer is not ``adapter_unavailable`` (a link coming up)."""
    with trio.fail_after(timeout):
        while True:
            reply = await worker.call(function_id, data, timeout=timeout)
            if reply.get("error", {}).get("code") != "adapter_unavailable":
                return ok(reply)
            await trio.sleep(0.05)


async def wait_for(predicate, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def connected(engine, *modules: str) -> bool:
    return all(engine.modules[name].adapter.link.connected for name in modules)


async def answer_jobs(worker: RawWorker, seen: list[Any], hold: trio.Event | None = None) -> None:
    """Answer every invocation; with ``hold``, the first stays unanswered."""
    first = True
    while True:
        message = await worker.receive_type("invokefunction", timeout=120)
        seen.append(message["data"])
        if first and hold is not None:
            first = False
            hold.set()
            continue
        await worker.send(
            {
                "type": "invocationresult",
                "invocation_id": message["invocation_id"],
                "function_id": message["function_id"],
                "result": None,
            }
        )


async def topic_stats(port: int, topic: str) -> dict[str, Any]:
    async with raw_worker_at(port) as on_backend:
        return ok(await on_backend.call("engine::queue::topic_stats", {"topic": topic}))


def called(line: str) -> Any:
    return json.loads(line.split(" ", 2)[2])
