"""The pytest plugin (entry point ``iii`` in ``pytest11``, installed with the package).

Fixtures for a project's tests of its workers, each a fresh engine per test:

* ``iii_engine_builder``: the :class:`~iii.embedding.builder.EngineBuilder` the
  engines are built from: the default modules, every listener on 127.0.0.1
  on a port the OS picks when it binds.  Override it in a ``conftest.py`` to
  add modules, adapters, native functions or a config file.
* ``iii_engine`` (async, for pytest-trio tests): a
  :class:`~iii.embedding.running.RunningEngine` served in the test's trio run.
* ``iii_engine_thread`` (for plain synchronous tests): an
  :class:`~iii.embedding.thread.EngineThread`, the engine in a thread.

Both shut the engine down gracefully when the test ends.  Importing this
module imports nothing but pytest: the engine is imported by the fixtures,
so a suite that uses none of them does not pay for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from iii.embedding.builder import EngineBuilder
    from iii.embedding.running import RunningEngine
    from iii.embedding.thread import EngineThread

__all__ = ["iii_engine_builder", "iii_engine", "iii_engine_thread"]


@pytest.fixture
def iii_engine_builder() -> EngineBuilder:
    """The builder of this test's engine (override it to configure the engine)."""
    from iii.embedding import EngineBuilder

    return EngineBuilder().free_ports()


@pytest.fixture
async def iii_engine(iii_engine_builder: EngineBuilder) -> AsyncIterator[RunningEngine]:
    """An engine serving in the test's trio run (pytest-trio)."""
    async with iii_engine_builder.open() as engine:
        yield engine


@pytest.fixture
def iii_engine_thread(iii_engine_builder: EngineBuilder) -> Iterator[EngineThread]:
    """An engine serving in a thread of its own, for synchronous tests."""
    with iii_engine_builder.run_in_thread() as engine:
        yield engine
