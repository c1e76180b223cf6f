"""Clusters of real engine processes (``python -m iii serve``) on one Redis, for the cluster tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from iii.client import ClientError, Endpoint, call_function
from tests.cluster.helpers import TOKEN, TOKEN_ENV
from tests.support import EngineProcess, free_port, require_redis


def shared_modules(
    prefix: str, *, rest_port: int = 0, stream_port: int = 0
) -> list[dict[str, Any]]:
    """Every module on Redis under one key prefix (what a cluster shares)."""
    url = require_redis()
    redis = {"redis_url": url, "key_prefix": prefix}
    return [
        {
            "class": "modules::api::RestApiModule",
            "config": {"port": rest_port, "host": "127.0.0.1"},
        },
        {
            "class": "modules::state::StateModule",
            "config": {
                "adapter": {"class": "modules::state::adapters::RedisAdapter", "config": redis}
            },
        },
        {
            "class": "modules::stream::StreamModule",
            "config": {
                "port": stream_port,
                "host": "127.0.0.1",
                "adapter": {"class": "modules::stream::adapters::RedisAdapter", "config": redis},
            },
        },
        {
            "class": "modules::pubsub::PubSubModule",
            "config": {"adapter": {"class": "modules::pubsub::RedisAdapter", "config": redis}},
        },
        {
            "class": "modules::queue::QueueModule",
            "config": {
                "adapter": {
                    "class": "modules::queue::RedisAdapter",
                    "config": {**redis, "poll_interval_ms": 20, "backoff_ms": 200},
                }
            },
        },
        {
            "class": "modules::cron::CronModule",
            "config": {"adapter": {"class": "modules::cron::RedisCronAdapter", "config": redis}},
        },
    ]


def engine_config(name: str, prefix: str, *, dead_after_ms: int = 1500) -> dict[str, Any]:
    return {
        "port": free_port(),
        "cluster": {
            "name": name,
            "redis_url": require_redis(),
            "token_env": TOKEN_ENV,
            "dead_after_ms": dead_after_ms,
        },
        "modules": shared_modules(prefix, rest_port=free_port(), stream_port=free_port()),
    }


@asynccontextmanager
async def engine_processes(
    tmp_path: Path, count: int, **kwargs: Any
) -> AsyncIterator[list[EngineProcess]]:
    """``count`` engine processes forming one cluster; killed on exit."""
    os.environ[TOKEN_ENV] = TOKEN  # the children inherit it
    name = f"ptest-{uuid.uuid4().hex[:8]}"
    prefix = f"iiitest:{uuid.uuid4().hex[:8]}:"
    engines = []
    try:
        for index in range(count):
            directory = tmp_path / f"e{index}"
            directory.mkdir()
            engine = EngineProcess.write(directory, engine_config(name, prefix, **kwargs))
            engine.start()
            engines.append(engine)
        for engine in engines:
            await engine.started(timeout=60)
        await wait_cluster_size(engines, count)
        yield engines
    finally:
        for engine in engines:
            engine.kill()


async def call(
    engine: EngineProcess, function_id: str, data: Any = None, *, timeout: float = 10.0
) -> Any:
    return await call_function(Endpoint.parse(engine.url), function_id, data, timeout=timeout)


async def wait_cluster_size(
    engines: list[EngineProcess], count: int, timeout: float = 60.0
) -> None:
    """Wait until every engine is linked to ``count - 1`` peers and has their catalogs."""
    with trio.fail_after(timeout):
        for engine in engines:
            while True:
                try:
                    status = await call(engine, "engine::cluster::status", {})
                except ClientError:
                    status = None
                if (
                    status is not None
                    and sum(1 for p in status["peers"] if p["synced"]) >= count - 1
                ):
                    break
                await trio.sleep(0.1)


async def wait_function(
    engine: EngineProcess, function_id: str, *, present: bool = True, timeout: float = 30.0
) -> None:
    with trio.fail_after(timeout):
        while True:
            listed = await call(engine, "engine::functions::list", {})
            if (function_id in {f["function_id"] for f in listed["functions"]}) == present:
                return
            await trio.sleep(0.05)


def rest_port(engine: EngineProcess) -> int:
    """The REST module's port in the engine's config (:func:`engine_config`)."""
    import yaml

    config = yaml.safe_load(engine.config_path.read_text())
    (rest,) = [m for m in config["modules"] if m["class"] == "modules::api::RestApiModule"]
    return int(rest["config"]["port"])


async def http_status(
    engine: EngineProcess, path: str, *, until: int, timeout: float = 30.0
) -> int:
    """GET ``path`` on the engine's REST port until it answers ``until`` (a
    route appears or vanishes as catalogs sync); returns that status."""
    import httpx

    async with httpx.AsyncClient() as client:
        with trio.fail_after(timeout):
            while True:
                response = await client.get(f"http://127.0.0.1:{rest_port(engine)}{path}")
                if response.status_code == until:
                    return response.status_code
                await trio.sleep(0.05)
