"""The mandatory telemetry module of upstream, accepted and kept silent.

Upstream's ``modules::telemetry::TelemetryModule`` sends an anonymous usage
heartbeat to a third party every 6 hours.  This engine sends nothing anywhere:
the module exists so that upstream config files that list it still load.  Its
config is accepted as given and ignored.

Lifetime: :meth:`Module.run` reports ready and returns; it holds nothing.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from iii.modules import ModuleStatistics

__all__ = ["Config", "Module"]


@attrs.frozen(kw_only=True)
class Config:
    """Any keys are accepted (upstream's config here is free-form)."""

    LENIENT = True
    raw: Any = None


class Module:
    def __init__(self, engine: Any, config: Config):
        self.config = config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
