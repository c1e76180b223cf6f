"""The module registry: which config ``class`` names exist and what implements them.

Every module lives in ``iii/modules/<name>.py`` (or a package of that name)
and has the same shape:

* ``Config``: a frozen attrs class with a default for every key; the config
  loader structures the entry's ``config`` block into it (unknown keys are an
  error naming them);
* ``Module(engine, config)``: an object with ``async run(*, task_status)``
  that registers its functions and trigger types, calls
  ``task_status.started()`` when it is ready, and then runs until cancelled.
  It owns its adapter and background tasks (its own nursery).

:data:`MODULE_SPECS` maps the upstream class names (spec modules.md, summary
table) to those Python modules.  It is explicit on purpose: no import strings
come from the config file.  A module is listed once in a config, except a
``repeatable`` one (exec: one pipeline per entry; bridge_client: one link per
remote engine), whose instances are named ``<name>:<instance name>`` in
``engine.modules``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

if TYPE_CHECKING:
    from iii.config import EngineConfig
    from iii.engine import Engine

__all__ = ["Module", "ModuleSpec", "MODULE_SPECS", "spec_for", "build_modules", "DEFAULT_MODULES"]

log = logging.getLogger(__name__)


class Module(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


@attrs.frozen
class ModuleSpec:
    class_name: str
    name: str
    # The Python module implementing it; None while it is not available here.
    implementation: str | None
    default: bool = False
    mandatory: bool = False
    # May be listed several times, one instance each (the exec module: one
    # pipeline per entry; bridge_client: one link per remote).  Its implementation then provides
    # ``name_instances(configs, *, file, keys)``, giving each a unique
    # ``name``; any other module listed twice is a config error.
    repeatable: bool = False

    @property
    def available(self) -> bool:
        return self.implementation is not None

    def load(self) -> ModuleType:
        assert self.implementation is not None
        return importlib.import_module(self.implementation)


_SPECS = [
    ModuleSpec("modules::worker::WorkerModule", "worker", "iii.modules.worker", mandatory=True),
    ModuleSpec("modules::telemetry::TelemetryModule", "telemetry", "iii.modules.telemetry", mandatory=True),
    ModuleSpec("modules::api::RestApiModule", "rest_api", "iii.modules.rest_api", default=True),
    ModuleSpec("modules::queue::QueueModule", "queue", "iii.modules.queue", default=True),
    ModuleSpec("modules::cron::CronModule", "cron", "iii.modules.cron", default=True),
    ModuleSpec("modules::stream::StreamModule", "stream", "iii.modules.stream", default=True),
    ModuleSpec("modules::state::StateModule", "state", "iii.modules.state", default=True),
    ModuleSpec("modules::pubsub::PubSubModule", "pubsub", "iii.modules.pubsub", default=True),
    ModuleSpec("modules::kv_server::KvServer", "kv_server", "iii.modules.kv_server", default=True),
    ModuleSpec("modules::observability::OtelModule", "observability", "iii.modules.observability"),
    ModuleSpec("modules::http_functions::HttpFunctionsModule", "http_functions", "iii.modules.http_functions"),
    ModuleSpec(
        "modules::shell::ExecModule", "exec", "iii.modules.exec", repeatable=True
    ),
    ModuleSpec(
        "modules::bridge_client::BridgeClientModule",
        "bridge_client",
        "iii.modules.bridge_client",
        repeatable=True,
    ),
]

MODULE_SPECS: dict[str, ModuleSpec] = {spec.class_name: spec for spec in _SPECS}
DEFAULT_MODULES = [spec.class_name for spec in _SPECS if spec.default]


def spec_for(class_name: str) -> ModuleSpec | None:
    return MODULE_SPECS.get(class_name)


def build_modules(engine: Engine, config: EngineConfig) -> Iterator[tuple[str, Any]]:
    """Instantiate the configured modules, in config order."""
    for entry in config.modules:
        spec = MODULE_SPECS[entry.class_name]
        if not spec.available:
            log.warning(
                "module %s (%s) is not available in this engine yet: its entry is ignored",
                spec.class_name,
                spec.name,
            )
            continue
        implementation = spec.load()
        name = f"{spec.name}:{entry.config.name}" if spec.repeatable else spec.name
        yield name, implementation.Module(engine, entry.config)
