"""The embedding API: build an engine in a Python program and run it on trio.

An :class:`EngineBuilder` collects a config (a file, a dict, builder calls, or
all three: the calls edit the tree the file or dict gave), native functions
and native trigger types.  Its config goes through
:func:`iii.config.parse_config`, the CLI's validation (an error is a
:class:`~iii.errors.ConfigError` naming the key), and it runs
:func:`iii.engine.serve_engine`, the CLI's engine: there is no second code
path.  Native functions and trigger types are registered after every module
is ready and before the worker port opens, so no worker sees the engine
without them::

    async def add(data: Any, ctx: CallContext) -> Any:
        return {"sum": data["a"] + data["b"]}

    builder = EngineBuilder().free_ports().function("math::add", add)
    async with builder.open() as engine:       # in the caller's task tree
        print(engine.url, engine.ports.rest_api)
        assert await engine.call("math::add", {"a": 1, "b": 2}) == {"sum": 3}

Lifetime: :meth:`EngineBuilder.open` runs the engine in a nursery of its
own, inside the ``async with`` block, and on leaving the block asks for the
CLI's graceful shutdown (in-flight calls get ``shutdown_grace_ms``, workers
are closed with 1012) and waits for it.  :meth:`EngineBuilder.serve` is the
same for ``await nursery.start(builder.serve)``.  A thread of its own, for
synchronous programs and tests, is :mod:`iii.embedding.thread`.

Ports: ``port(0)`` (and :meth:`EngineBuilder.free_ports`) bind port 0, so the
OS picks a free port at bind time (never pick-then-release); the bound ports
are on :attr:`RunningEngine.ports`.  In a file or dict, ``port: 0`` keeps its
upstream meaning (the default port 49134).
"""

from __future__ import annotations

from iii.embedding.builder import EngineBuilder
from iii.embedding.native import FunctionHandler, Trigger, TriggerTypeHandler
from iii.embedding.running import EnginePorts, RunningEngine
from iii.embedding.thread import EngineThread

__all__ = [
    "EngineBuilder",
    "RunningEngine",
    "EngineThread",
    "EnginePorts",
    "FunctionHandler",
    "Trigger",
    "TriggerTypeHandler",
]

# Files: builder.py (EngineBuilder), running.py (RunningEngine, EnginePorts),
# native.py (native functions and trigger types), thread.py (EngineThread).
