"""A Redis outage degrades only membership; the view heals when Redis returns.

The engines reach Redis through a TCP proxy owned by the test: cutting it is
a real outage (connections reset, new ones refused) without touching the
Redis other tests share.
"""

from __future__ import annotations

import gc
from contextlib import AsyncExitStack

import attrs
import pytest
import trio

from iii.testing import connect_test_worker, open_test_engine
from tests.cluster.helpers import (
    cluster_config,
    cluster_of,
    new_cluster_name,
    sees_function,
    wait_for,
    wait_full_view,
)
from tests.cluster.test_cluster_basic import serve_echo
from tests.support import free_port

pytestmark = [
    pytest.mark.services,
    # coredis 6.9 leaves the memory streams of a connection Redis dropped as
    # garbage (as in tests/adapters/test_redis_outage.py): collected inside
    # the test so this filter covers them and nothing else.
    pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@attrs.define(eq=False)
class TcpProxy:
    """127.0.0.1:<port> -> Redis; ``cut`` closes everything, ``restore`` listens again."""

    port: int
    target: tuple[str, int] = ("127.0.0.1", 6379)
    scope: trio.CancelScope | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self.scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._pipe, listeners, handler_nursery=nursery)

    async def _pipe(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(*self.target) as server:

            async def copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                try:
                    async for chunk in source:
                        await sink.send_all(chunk)
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy, client, server)
                nursery.start_soon(copy, server, client)

    def cut(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


async def test_local_and_linked_calls_survive_a_redis_outage_and_the_view_heals() -> None:
    proxy = TcpProxy(free_port())
    name = new_cluster_name()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        config = cluster_config(name)
        config = attrs.evolve(
            config,
            cluster=attrs.evolve(config.cluster, redis_url=f"redis://127.0.0.1:{proxy.port}"),  # type: ignore[arg-type]
        )
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(open_test_engine(config))
            b = await stack.enter_async_context(open_test_engine(config))
            await wait_full_view([a, b])
            async with (
                connect_test_worker(b) as worker,
                connect_test_worker(a) as caller,
                trio.open_nursery() as serving,
            ):
                await worker.send({"type": "registerfunction", "id": "t::o"})
                await wait_for(lambda: sees_function(a, "t::o"))
                serving.start_soon(serve_echo, worker, "t::o")
                proxy.cut()
                membership = cluster_of(a).membership
                assert membership is not None
                failures = membership.failures
                await wait_for(lambda: membership.failures > failures + 1, timeout=30)
                assert not membership.healthy
                # The view is kept, the link is up: the call still crosses engines.
                for n in range(5):
                    answer = await caller.call("t::o", {"n": n})
                    assert answer.get("error") is None, answer
                # Redis is back: membership is refreshed and a new engine finds both.
                await nursery.start(proxy.serve)
                await wait_for(lambda: membership.healthy, timeout=30)
                async with open_test_engine(config) as c:
                    await wait_full_view([a, b, c], timeout=30)
                    async with connect_test_worker(c) as on_c:
                        answer = await on_c.call("t::o", {"n": "healed"})
                        assert answer.get("error") is None, answer
                serving.cancel_scope.cancel()
        proxy.cut()
    gc.collect()
