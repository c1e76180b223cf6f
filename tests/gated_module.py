"""A module that reports ready only when the test opens its gate (``GATE.set()``).

For the readiness tests: the modules listed before it are up, the engine is
not ready yet (its later modules and the worker port are not started).
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from iii.modules import ModuleStatistics

GATE: trio.Event | None = None  # set by the test before the engine starts


@attrs.frozen(kw_only=True)
class Config:
    pass


class Module:
    def __init__(self, engine: Any, config: Config):
        self.engine = engine

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert GATE is not None, "set tests.gated_module.GATE first"
        await GATE.wait()
        task_status.started()
        await trio.sleep_forever()

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()
