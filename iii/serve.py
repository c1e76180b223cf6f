"""How an engine runs: :func:`serve_engine`, THE supervision tree and the shutdown order.

Supervision tree (copied into README.rst)::

    trio.run
    └── serve_engine                      engine nursery
        ├── signal watcher                SIGTERM/SIGINT -> graceful shutdown
        ├── invocation expiry             answers ``timeout`` for every call past its
        │                                 deadline (one heap: a routed call is resolved,
        │                                 an engine function's scope is cancelled)
        └── module nursery                one task per module (``await start(module.run)``,
            │                             in config order); each module owns its adapter
            │                             and its own nursery; modules exit last
            ├── <module>.run ...
            │   └── EngineLink.run        bridge_client (and Bridge adapters): the link to a
            │       │                     remote engine; connect, reattach, re-register;
            │       │                     on a drop, fail calls in flight, back off, reconnect
            │       └── link connection   per-connection nursery: reader, writer, heartbeat,
            │                             calls from the remote (bounded, each with a deadline)
            └── connection nursery        owned by the engine
                ├── WS listener           port 49134: "/", "/otel", "/ws/channels/{id}";
                │                         counts sockets on accept (iii.admission)
                ├── socket (iii.wsserver) one per accepted socket, supervised: the library's
                │   │                     WS reader and the handler below, in its own nursery
                │   └── WorkerConnection.run  one per worker, with a per-connection nursery:
                │       ├── reader        decodes and dispatches, never awaits a call inline
                │       ├── writer        FrameWriter: batches the bounded send queue
                │       │                 (backpressure; a slow consumer is dropped)
                │       ├── heartbeat     WS ping; no pong in time -> connection dropped
                │       └── invocation tasks  one per request/response call the worker
                │                         made, each under its own deadline
                │   (or a channel side, or an /otel socket)
                ├── detached calls        fire-and-forget calls: owned by the engine, not
                │                         by the caller, so a caller that leaves right after
                │                         sending (``trigger_void`` then exit) loses nothing
                └── cluster (iii.cluster) with a ``cluster:`` section: Redis membership and
                                          one supervised link per peer engine (see there)

A disconnect cancels exactly that worker's nursery: its reader, writer and the
calls it was waiting on.  Calls routed *to* it end ``invocation_stopped``.  A
link (:mod:`iii.link`) that drops cancels its own connection's nursery only;
its calls in flight end ``invocation_stopped`` and it reconnects.  A
module that crashes raises through the module nursery and stops the engine
(one-for-all; systemd restarts it).  Nothing else is one-for-all: a failure in
one socket's subtree, one call task, one detached call or one event a module
dispatches is logged with its id and ends that one only (:mod:`iii.wsserver`,
:mod:`iii.containment`).

Shutdown order (SIGTERM/SIGINT or :meth:`Engine.request_shutdown`):

1. stop intake: the listener closes, ``engine.shutting_down`` is set (modules
   stop their trigger sources: cron ticks, queue pulls);
2. in-flight calls get ``shutdown_grace`` seconds to finish;
3. workers are closed with 1012 (service restart), not 1000/1001, so both
   SDK generations reconnect to the next engine (spec protocol.md §1);
4. in a cluster, the engine leaves the membership (peers drop it at once);
   the connection nursery is cancelled, then modules exit (and close their
   adapters); ``serve_engine`` returns.

A program that embeds the engine (:mod:`iii.embedding`) runs this same
:func:`serve_engine` in its own task tree; its native functions and trigger
types are registered through ``before_listen``, after the modules and before
the listener.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from iii.engine import Engine
from iii.listener import serve_listener
from iii.modules import build_modules, module_class_name
from iii.services import ServiceRefusedError, module_service

if TYPE_CHECKING:
    from iii.config_schema import EngineConfig

__all__ = ["serve_engine"]

log = logging.getLogger("iii.engine")


async def watch_signals(engine: Engine) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            engine.request_shutdown()
            return


async def drain(engine: Engine, listener_scope: trio.CancelScope) -> None:
    """Shutdown steps 1–3 (see the module docstring)."""
    listener_scope.cancel()
    engine.shutting_down.set()
    with trio.move_on_after(engine.config.shutdown_grace):
        await engine.wait_idle()
    if engine.inflight or len(engine.pending):
        log.warning(
            "shutdown grace over with %d calls in flight; they are cancelled",
            engine.inflight + len(engine.pending),
        )
    with trio.move_on_after(2):
        async with trio.open_nursery() as closing:
            for connection in list(engine.connections.values()):
                closing.start_soon(connection.close_for_restart)


async def serve_engine(
    config: EngineConfig,
    *,
    handle_signals: bool = True,
    engine: Engine | None = None,
    before_listen: Callable[[Engine], None] | None = None,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the engine until shutdown is requested; see the module docstring.

    ``before_listen`` is called once every module is ready and before the
    worker port opens (the embedding API registers its native functions and
    trigger types there, so no worker sees the engine without them); an
    exception it raises stops the engine before it serves.
    """
    if engine is None:
        engine = Engine(config)
    async with trio.open_nursery() as engine_nursery:
        engine_nursery.start_soon(engine.expire_invocations)
        if handle_signals:
            engine_nursery.start_soon(watch_signals, engine)
        async with trio.open_nursery() as module_nursery:
            for name, module in build_modules(engine, config):
                engine.modules[name] = module
                before = set(engine.registry.functions)
                await module_nursery.start(module.run)
                service = module_service(
                    name,
                    set(engine.registry.functions) - before,
                    class_name=module_class_name(name),
                )
                if service is not None:
                    try:
                        engine.registry.add_service(service)
                    except ServiceRefusedError as exc:  # listing only: not worth a crash
                        log.warning("module %s: its service is not listed: %s", name, exc)
                log.debug("module %s ready", name)
            if before_listen is not None:
                before_listen(engine)
            async with trio.open_nursery() as connection_nursery:
                engine.connection_nursery = connection_nursery
                listener_scope = trio.CancelScope()
                server = await connection_nursery.start(serve_listener, engine, listener_scope)
                engine.listen_port = server.port
                log.info(
                    "iii engine listening on %s://%s:%d (%d modules%s)",
                    "wss" if config.tls.enabled else "ws",
                    config.host,
                    engine.listen_port,
                    len(engine.modules),
                    ", worker auth on" if engine.authenticator.enabled else "",
                )
                if config.cluster is not None:
                    from iii.cluster import serve_cluster

                    await connection_nursery.start(serve_cluster, engine)
                engine.ready.set()
                task_status.started(engine)
                await engine.shutdown_requested.wait()
                await drain(engine, listener_scope)
                if engine.cluster is not None:
                    await engine.cluster.leave()  # while Redis is still open
                connection_nursery.cancel_scope.cancel()
            engine.connection_nursery = None
            module_nursery.cancel_scope.cancel()
            engine_nursery.cancel_scope.cancel()
    log.info("iii engine stopped")
