"""The mandatory telemetry module of upstream, accepted and kept silent.

Upstream's ``modules::telemetry::TelemetryModule`` sends an anonymous usage
heartbeat to a third party every 6 hours.  This engine sends nothing anywhere:
the module exists so that upstream config files that list it still load.  Its
config takes upstream's keys (checked like any other module's) and ignores
them.

Lifetime: :meth:`Module.run` reports ready and returns; it holds nothing.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from iii.config_schema import Count
from iii.modules import ModuleStatistics

__all__ = ["Config", "Module"]


@attrs.frozen(kw_only=True)
class Config:
    """Upstream's keys (v0.4 ``TelemetryConfig``), accepted and unused."""

    enabled: bool = True
    api_key: str = ""
    sdk_api_key: str | None = None
    heartbeat_interval_secs: Count = Count(6 * 60 * 60)


class Module:
    def __init__(self, engine: Any, config: Config):
        self.config = config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def statistics(self) -> ModuleStatistics:
        return ModuleStatistics()  # nothing to report
