"""The module registry: which config ``class`` names exist and what implements them.

Every module lives in ``iii/modules/<name>.py`` (or a package of that name)
and has the same shape:

* ``Config``: a frozen attrs class with a default for every key, built from
  :mod:`iii.config_schema` types; the config loader structures the entry's
  ``config`` block into it, down to the chosen backend's config for an
  ``adapter: <Kind>AdapterRef`` field (unknown keys are an error naming
  their full path);
* ``Module(engine, config)``: an object with ``async run(*, task_status)``
  that registers its functions and trigger types, calls
  ``task_status.started()`` when it is ready, and then runs until cancelled.
  It owns its adapter and background tasks (its own nursery);
* ``statistics()``: its numbers now, as a :class:`ModuleStatistics` (the one
  shape every module returns; ``ModuleStatistics()`` when it has nothing to
  report).  The observability module shows them on ``/metrics`` and in
  ``engine::metrics::list``.  A module whose numbers live behind I/O also
  has ``async refresh_statistics()``, awaited (bounded) before each of those.

Every module class is checked against :class:`Module` by mypy
(:mod:`iii.modules._conformance`).

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
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

if TYPE_CHECKING:
    from iii.config_schema import EngineConfig
    from iii.engine import Engine

__all__ = [
    "Module",
    "ModuleStatistics",
    "StatisticsRow",
    "ModuleSpec",
    "MODULE_SPECS",
    "spec_for",
    "module_class_name",
    "build_modules",
    "DEFAULT_MODULES",
]

log = logging.getLogger(__name__)


Number = int | float


@attrs.frozen(kw_only=True)
class StatisticsRow:
    """One row of a statistics table, e.g. one queue's depth: labels and numbers."""

    labels: Mapping[str, str]
    values: Mapping[str, Number]

    def to_json(self) -> dict[str, str | Number]:
        return {**self.labels, **self.values}


@attrs.frozen(kw_only=True)
class ModuleStatistics:
    """A module's numbers now (trio's ``statistics()`` convention: a frozen snapshot).

    * ``values``: name -> number; ``None`` is a number not known yet (shown as
      ``null`` in ``engine::metrics::list``, left out of ``/metrics``).  Each
      becomes the gauge ``iii_module_<module>_<name>``.
    * ``tables``: name -> rows; each number column of a table becomes the
      gauge ``iii_module_<module>_<table>_<column>``, one sample per row,
      labelled with the row's labels.
    """

    values: Mapping[str, Number | None] = attrs.field(factory=dict)
    tables: Mapping[str, Sequence[StatisticsRow]] = attrs.field(factory=dict)

    def __getitem__(self, name: str) -> Number | None:
        return self.values[name]

    @property
    def empty(self) -> bool:
        return not self.values and not self.tables

    def to_json(self) -> dict[str, object]:
        """As ``engine::metrics::list`` shows it: values and tables in one object."""
        out: dict[str, object] = dict(self.values)
        for name, rows in self.tables.items():
            out[name] = [row.to_json() for row in rows]
        return out


class Module(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    def statistics(self) -> ModuleStatistics: ...


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
    ModuleSpec(
        "modules::telemetry::TelemetryModule", "telemetry", "iii.modules.telemetry", mandatory=True
    ),
    ModuleSpec("modules::api::RestApiModule", "rest_api", "iii.modules.rest_api", default=True),
    ModuleSpec("modules::queue::QueueModule", "queue", "iii.modules.queue", default=True),
    ModuleSpec("modules::cron::CronModule", "cron", "iii.modules.cron", default=True),
    ModuleSpec("modules::stream::StreamModule", "stream", "iii.modules.stream", default=True),
    ModuleSpec("modules::state::StateModule", "state", "iii.modules.state", default=True),
    ModuleSpec("modules::pubsub::PubSubModule", "pubsub", "iii.modules.pubsub", default=True),
    ModuleSpec("modules::kv_server::KvServer", "kv_server", "iii.modules.kv_server", default=True),
    ModuleSpec("modules::observability::OtelModule", "observability", "iii.modules.observability"),
    ModuleSpec(
        "modules::http_functions::HttpFunctionsModule",
        "http_functions",
        "iii.modules.http_functions",
    ),
    ModuleSpec("modules::shell::ExecModule", "exec", "iii.modules.exec", repeatable=True),
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


def module_class_name(name: str) -> str | None:
    """The config class of the module named ``name`` in ``engine.modules`` (``exec:<instance>``)."""
    base = name.partition(":")[0]
    return next((spec.class_name for spec in _SPECS if spec.name == base), None)


def build_modules(engine: Engine, config: EngineConfig) -> Iterator[tuple[str, Module]]:
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
