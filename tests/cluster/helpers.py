"""Clusters of engines in one test: in-process (one trio run) on one Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import trio

from iii.cluster import Cluster
from iii.config import EngineConfig, parse_config
from iii.engine import Engine
from iii.testing import open_test_engine
from tests.support import require_redis

TOKEN_ENV = "III_TEST_CLUSTER_TOKEN"
TOKEN = "cluster-test-token-0123456789"


def cluster_config(
    name: str,
    *,
    dead_after_ms: int = 1000,
    modules: list[dict[str, Any]] | None = None,
    **keys: Any,
) -> EngineConfig:
    url = require_redis()
    env = {**os.environ, TOKEN_ENV: TOKEN}
    raw = {
        "modules": modules or [],
        "cluster": {
            "name": name,
            "redis_url": url,
            "token_env": TOKEN_ENV,
            "dead_after_ms": dead_after_ms,
        },
        **keys,
    }
    return attrs.evolve(parse_config(raw, env=env), port=0)


def new_cluster_name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


async def wait_for(predicate: Any, timeout: float = 10.0, step: float = 0.02) -> None:
    """Poll a cheap in-memory predicate (not a timing assertion: it waits for a state)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


def cluster_of(engine: Engine) -> Cluster:
    assert engine.cluster is not None
    return engine.cluster


async def wait_full_view(engines: list[Engine], timeout: float = 10.0) -> None:
    ids = {cluster_of(e).engine_id for e in engines}

    def ready() -> bool:
        for engine in engines:
            cluster = engine.cluster
            if cluster is None:
                return False
            others = ids - {cluster.engine_id}
            if set(cluster.peers) != others:
                return False
            if any(
                not cluster.peers[i].link.connected or cluster.peers[i].catalog is None
                for i in others
            ):
                return False
        return True

    await wait_for(ready, timeout)


@asynccontextmanager
async def open_cluster(
    count: int, *, name: str | None = None, **kwargs: Any
) -> AsyncIterator[list[Engine]]:
    name = name or new_cluster_name()
    async with AsyncExitStack() as stack:
        engines = [
            await stack.enter_async_context(open_test_engine(cluster_config(name, **kwargs)))
            for _ in range(count)
        ]
        await wait_full_view(engines)
        yield engines


def sees_function(engine: Engine, function_id: str) -> bool:
    return function_id in engine.registry.functions
