"""Backends for the state/stream/pubsub tests: memory, file and Redis, each isolated.

Redis runs on 127.0.0.1:6379 (skipped when absent, failed under
``III_REQUIRE_SERVICES=1``).  Each test gets its own ``key_prefix`` and its
keys are deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis

from tests.support import backend_params, require_redis

KINDS = ("memory", "file", "redis")
# KINDS as parameters: the Redis case carries the ``services`` mark
KIND_PARAMS = backend_params(*KINDS)

CLASSES = {
    "state": ("modules::state::adapters::KvStore", "modules::state::adapters::RedisAdapter"),
    "stream": ("modules::stream::adapters::KvStore", "modules::stream::adapters::RedisAdapter"),
    "pubsub": ("modules::pubsub::LocalAdapter", "modules::pubsub::RedisAdapter"),
}


def new_prefix() -> str:
    return f"iii-test-{uuid.uuid4().hex[:12]}:"


def adapter_block(
    module: str, kind: str, tmp_path: Path, *, prefix: str | None = None, url: str | None = None
) -> dict[str, Any]:
    embedded, redis = CLASSES[module]
    if kind == "memory":
        return {"class": embedded, "config": {}}
    if kind == "file":
        return {
            "class": embedded,
            "config": {
                "store_method": "file_based",
                "file_path": str(tmp_path / f"{module}-store"),
            },
        }
    return {
        "class": redis,
        "config": {"redis_url": url or require_redis(), "key_prefix": prefix or new_prefix()},
    }


async def delete_prefix(prefix: str, url: str = "redis://127.0.0.1:6379") -> None:
    async with coredis.Redis.from_url(url) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(keys)


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    url = require_redis()
    prefix = new_prefix()
    try:
        yield prefix
    finally:
        await delete_prefix(prefix, url)
