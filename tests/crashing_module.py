"""A module that crashes shortly after starting (fault injection for the engine tests)."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from iii.modules import ModuleStatistics


class ModuleCrashed(Exception):
    pass


@attrs.frozen(kw_only=True)
class Config:
    pass


class Module:
    def __init__(self, engine: Any, config: Config):
        self.engine = engine

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.engine.ready.wait()
        raise ModuleCrashed("module failed")

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()
