"""Every module's ``statistics()``: one shape (``ModuleStatistics``), in /metrics and
``engine::metrics::list``.

mypy checks each module class against the ``Module`` Protocol
(``iii/modules/_conformance.py``, run by ``tests/test_typing.py``); these tests
check what the observability module makes of the snapshots at run time.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from iii.modules import ModuleStatistics, StatisticsRow
from iii.modules.observability.metrics import module_statistics_json
from iii.testing import connect_test_worker, make_config, open_test_engine
from tests.modules.test_observability import http_get

MODULES = [
    {
        "class": "modules::observability::OtelModule",
        "config": {"enabled": True, "exporter": "memory", "prometheus_port": 0},
    },
    {"class": "modules::api::RestApiModule", "config": {"port": 0, "host": "127.0.0.1"}},
    {"class": "modules::queue::QueueModule", "config": {}},
    {"class": "modules::cron::CronModule", "config": {}},
    {"class": "modules::stream::StreamModule", "config": {"port": 0, "host": "127.0.0.1"}},
    {"class": "modules::state::StateModule", "config": {}},
    {"class": "modules::pubsub::PubSubModule", "config": {}},
    {"class": "modules::kv_server::KvServer", "config": {}},
    {"class": "modules::http_functions::HttpFunctionsModule", "config": {}},
]


def test_statistics_json_puts_values_and_tables_in_one_object() -> None:
    snapshot = ModuleStatistics(
        values={"jobs": 3, "read_at": None},
        tables={"depth": [StatisticsRow(labels={"topic": "a"}, values={"waiting": 2, "dlq": 0})]},
    )
    assert snapshot["jobs"] == 3 and not snapshot.empty and ModuleStatistics().empty
    assert snapshot.to_json() == {
        "jobs": 3,
        "read_at": None,
        "depth": [{"topic": "a", "waiting": 2, "dlq": 0}],
    }


async def test_every_module_reports_the_one_shape_and_the_empty_ones_are_left_out() -> None:
    async with open_test_engine(make_config(modules=MODULES)) as engine:
        snapshots = {name: module.statistics() for name, module in engine.modules.items()}
        assert all(isinstance(s, ModuleStatistics) for s in snapshots.values())
        reporting = {name for name, s in snapshots.items() if not s.empty}
        assert reporting == {"observability", "rest_api", "queue", "cron"}
        async with connect_test_worker(engine) as worker:
            answer = await worker.call("engine::metrics::list", {})
        listed: dict[str, Any] = answer["result"]["module_statistics"]
        assert set(listed) == reporting
        # The same names as the snapshots (the numbers move: the call itself is traced).
        assert {n: set(v) for n, v in listed.items()} == {
            n: set(v) for n, v in module_statistics_json(engine).items()
        }
        assert listed["cron"] == {
            "jobs": 0,
            "fired_ok": 0,
            "fired_failed": 0,
            "skipped_by_condition": 0,
            "missed": 0,
            "fired_elsewhere": 0,
            "lock_unavailable": 0,
        }

        port = engine.modules["observability"].prometheus_port
        status, _, body = await http_get(port, "/metrics")
        assert status == 200
        names = {
            sample.name
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        # Each number of each module that reports is a gauge; nothing else is.
        for name in reporting:
            for field, value in listed[name].items():
                if isinstance(value, (int, float)):
                    assert f"iii_module_{name}_{field}" in names
        prefixes = tuple(f"iii_module_{name}_" for name in reporting)
        assert all(n.startswith(prefixes) for n in names if n.startswith("iii_module_"))
