"""An embedded engine in a thread of its own, for synchronous programs and tests.

:class:`EngineThread` is a context manager (``with builder.run_in_thread() as
engine:``).  Entering it starts a thread that runs ``trio.run`` around
:meth:`~iii.embedding.builder.EngineBuilder.open`, and returns once the engine serves
(or raises what stopped it from starting: a
:class:`~iii.errors.ConfigError`, a bind error …).  Its methods call into that
trio run with ``trio.from_thread``.  Leaving the block asks for the graceful
shutdown and joins the thread; an error the engine ended with is raised then.

Lifetime: the thread, its trio run and the engine live exactly as long as the
``with`` block.  Signals are not handled there (trio can only receive them in
the main thread): the program that owns the thread stops it.
"""

from __future__ import annotations

import threading
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from iii.config import EngineConfig

if TYPE_CHECKING:
    from iii.embedding.builder import EngineBuilder
    from iii.embedding.running import EnginePorts, RunningEngine

__all__ = ["EngineThread"]

# How long leaving the block waits for the engine's graceful shutdown, beyond
# its own shutdown_grace.
STOP_MARGIN = 30.0


class EngineThread:
    """A running engine owned by a thread (see the module docstring)."""

    def __init__(self, builder: EngineBuilder, *, start_timeout: float = 60.0) -> None:
        self._builder = builder
        self._start_timeout = start_timeout
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: RunningEngine | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        # Guards the hand-over of the running engine against a start that
        # timed out: the engine thread then stops as soon as it is ready.
        self._handover = threading.Lock()
        self._abandoned = False

    # -- what the engine bound ------------------------------------------------------------

    @property
    def running(self) -> RunningEngine:
        if self._running is None:
            raise RuntimeError("the engine is not running (use it inside the with block)")
        return self._running

    @property
    def config(self) -> EngineConfig:
        return self.running.config

    @property
    def ports(self) -> EnginePorts:
        return self.running.ports

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def rest_url(self) -> str | None:
        return self.running.rest_url

    # -- calls into the engine's trio run --------------------------------------------------

    def _run(self, fn: Any, *args: Any) -> Any:
        assert self._token is not None
        return trio.from_thread.run(partial(fn, *args), trio_token=self._token)

    def _run_sync(self, fn: Any, *args: Any) -> Any:
        assert self._token is not None
        return trio.from_thread.run_sync(partial(fn, *args), trio_token=self._token)

    def call(self, function_id: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """:meth:`RunningEngine.call <iii.embedding.running.RunningEngine.call>`, blocking."""
        running = self.running
        return self._run(partial(running.call, timeout=timeout), function_id, data)

    def call_void(self, function_id: str, data: Any = None) -> None:
        self._run_sync(self.running.call_void, function_id, data)

    def wait_for_function(self, function_id: str, *, timeout: float = 30.0) -> None:
        """Block until ``function_id`` is registered (a worker registered it);
        :class:`trio.TooSlowError` after ``timeout`` seconds."""
        running = self.running

        async def wait() -> None:
            with trio.fail_after(timeout):
                await running.wait_for_function(function_id)

        self._run(wait)

    def register_trigger(
        self, trigger_type: str, function_id: str, config: Any = None, *, metadata: Any = None
    ) -> str:
        running = self.running
        trigger_id: str = self._run_sync(
            partial(running.register_trigger, metadata=metadata), trigger_type, function_id, config
        )
        return trigger_id

    def unregister_trigger(self, trigger_id: str) -> None:
        self._run_sync(self.running.unregister_trigger, trigger_id)

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> EngineThread:
        if self._thread is not None:
            raise RuntimeError("an EngineThread runs once")
        self._thread = threading.Thread(target=self._main, name="iii-engine", daemon=True)
        self._thread.start()
        if not self._started.wait(self._start_timeout):
            with self._handover:
                self._abandoned = True  # it stops by itself if it ever starts
            raise TimeoutError(f"the engine did not start within {self._start_timeout:g}s")
        if self._running is None:
            self._thread.join(self._start_timeout)
            error = self._error
            assert error is not None
            raise _leaf(error)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut the engine down gracefully and join the thread (idempotent)."""
        thread = self._thread
        if thread is None or self._running is None:
            return
        if thread.is_alive() and self._stop is not None:
            try:
                self._run_sync(self._stop.set)
            except trio.RunFinishedError:
                pass  # the engine already ended (it crashed: the error is raised below)
        thread.join(self._running.config.shutdown_grace + STOP_MARGIN)
        if thread.is_alive():
            raise TimeoutError("the engine thread did not stop")
        self._running = None
        if self._error is not None:
            raise _leaf(self._error)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - handed to the owning thread
            self._error = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with self._builder.open() as running:
            with self._handover:
                if self._abandoned:
                    return
                self._token = trio.lowlevel.current_trio_token()
                self._running = running
            self._started.set()
            await self._stop.wait()


def _leaf(exc: BaseException) -> BaseException:
    """A one-leaf exception group's leaf (a config error reads as one)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
