"""The service registry (iii/services.py) and ``engine::services::list``.

The table on its own (bounds, ownership, grouping), then through the engine:
raw workers (memory streams) sending ``registerservice`` as 0.4.1 and 0.9.0
send it, hostile ones, and modules' services.  The real SDKs are in
``tests/test_services_sdk.py``.
"""

from __future__ import annotations

import logging

import pytest
import trio

from iii.log import LineFormatter
from iii.services import (
    MAX_SERVICE_BYTES,
    MAX_SERVICE_BYTES_PER_WORKER,
    MAX_SERVICES_PER_WORKER,
    REGISTRATION_OVERHEAD,
    ServiceRefusedError,
    ServiceRegistration,
    ServiceTable,
    module_service,
)
from iii.testing import connect_test_worker, make_config, open_test_engine


async def settle(predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def worker_service(service_id: str, owner: str, **fields) -> ServiceRegistration:
    return ServiceRegistration(
        id=service_id, name=fields.pop("name", service_id), owner=owner, **fields
    )


def by_id(listing):
    return {service["id"]: service for service in listing}


# -- the table -------------------------------------------------------------------


def test_a_service_lives_while_any_registrant_does_and_shows_the_latest():
    table = ServiceTable()
    assert table.add(worker_service("pay", "w1", description="one")) is True
    assert table.add(worker_service("pay", "w2", description="two")) is False
    listed = by_id(table.listing([]))["pay"]
    assert listed["description"] == "two" and listed["owner"] == {"type": "worker", "id": "w2"}
    assert sorted(listed["worker_ids"]) == ["w1", "w2"]
    assert table.remove_worker("w2") == []
    listed = by_id(table.listing([]))["pay"]
    assert listed["description"] == "one" and listed["worker_ids"] == ["w1"]
    assert table.remove_worker("w1") == ["pay"]
    assert table.services == {} and table.total_bytes == 0 and table.total_registrations == 0


def test_re_registering_replaces_the_workers_own_entry_and_counts_once():
    table = ServiceTable()
    for description in ("a", "bb", "ccc"):
        table.add(worker_service("svc", "w1", description=description))
    assert table.total_registrations == 1
    assert table.total_bytes == REGISTRATION_OVERHEAD + len("svc") * 2 + 3
    assert by_id(table.listing([]))["svc"]["description"] == "ccc"


def test_a_worker_cannot_take_over_a_module_service():
    table = ServiceTable()
    table.add(ServiceRegistration(id="state", name="state", module="modules::state::StateModule"))
    with pytest.raises(ServiceRefusedError, match="engine module"):
        table.add(worker_service("state", "w1", description="mine now"))
    listed = by_id(table.listing([]))["state"]
    assert listed["owner"] == {"type": "module", "id": "modules::state::StateModule"}
    assert "w1" not in table.by_worker


def test_bounds_refuse_and_change_nothing():
    table = ServiceTable()
    with pytest.raises(ServiceRefusedError, match="must not be empty"):
        table.add(worker_service("", "w1"))
    with pytest.raises(ServiceRefusedError, match="bytes"):
        table.add(worker_service("big", "w1", description="é" * (MAX_SERVICE_BYTES // 2)))
    assert table.services == {} and table.total_bytes == 0

    for index in range(MAX_SERVICES_PER_WORKER):
        table.add(worker_service(f"s{index}", "w1"))
    with pytest.raises(ServiceRefusedError, match="at most"):
        table.add(worker_service("one-more", "w1"))
    # Re-registering one it holds is still allowed; another worker is not affected.
    table.add(worker_service("s0", "w1", description="updated"))
    table.add(worker_service("one-more", "w2"))
    assert len(table.by_worker["w1"]) == MAX_SERVICES_PER_WORKER
    assert "one-more" in table.services and "w1" not in table.services["one-more"].registrations

    # Bytes per worker: descriptions just under the per-service bound.
    description = "x" * (MAX_SERVICE_BYTES - REGISTRATION_OVERHEAD - 64)
    held = 0
    with pytest.raises(ServiceRefusedError, match="would take"):
        while True:
            table.add(worker_service(f"d{held}", "w3", description=description))
            held += 1
    refused = worker_service(f"d{held}", "w3", description=description)
    held_bytes = sum(table.by_worker["w3"].values())
    assert held_bytes <= MAX_SERVICE_BYTES_PER_WORKER < held_bytes + refused.size
    assert held == len(table.by_worker["w3"]) > 1
    assert f"d{held}" not in table.services


def test_functions_group_under_the_longest_registered_prefix_else_the_first_segment():
    table = ServiceTable()
    table.add(worker_service("payments", "w1"))
    table.add(worker_service("payments::refunds", "w1", parent_service_id="payments"))
    functions = [
        "payments::charge",
        "payments::refunds::create",
        "payments::refunds::list::all",
        "orders::create",
        "orders::x::y",
        "noprefix",
    ]
    listed = by_id(table.listing(functions))
    assert listed["payments"]["functions"] == ["payments::charge"]
    assert listed["payments::refunds"]["functions"] == [
        "payments::refunds::create",
        "payments::refunds::list::all",
    ]
    assert listed["payments::refunds"]["parent_service_id"] == "payments"
    # Nobody registered "orders": an implicit service, as upstream creates it.
    assert listed["orders"] == {
        "id": "orders",
        "name": "orders",
        "description": None,
        "parent_service_id": None,
        "owner": None,
        "worker_ids": [],
        "implicit": True,
        "functions": ["orders::create", "orders::x::y"],
    }
    assert set(listed) == {"payments", "payments::refunds", "orders"}


def test_a_module_service_lists_the_functions_it_registered_whatever_their_ids():
    table = ServiceTable()
    service = module_service("queue", ["enqueue", "engine::queue::enqueue", "iii::queue::redrive"])
    assert service is not None
    table.add(service)
    table.add(
        ServiceRegistration(id="engine", name="engine", module="modules::worker::WorkerModule")
    )
    listed = by_id(
        table.listing(["enqueue", "engine::queue::enqueue", "iii::queue::redrive", "engine::x"])
    )
    assert listed["queue"]["functions"] == [
        "engine::queue::enqueue",
        "enqueue",
        "iii::queue::redrive",
    ]
    assert listed["engine"]["functions"] == ["engine::x"]
    assert "iii" not in listed
    assert (
        module_service("exec:build") is not None and module_service("exec:build").id == "exec:build"
    )
    assert module_service("no-such-module") is None


# -- through the engine ------------------------------------------------------------------

MODULES = [
    {"class": "modules::state::StateModule"},
    {"class": "modules::stream::StreamModule", "config": {"port": 0}},
    {"class": "modules::queue::QueueModule"},
    {"class": "modules::cron::CronModule"},
    {"class": "modules::pubsub::PubSubModule"},
    {"class": "modules::kv_server::KvServer"},
]


async def test_modules_register_as_services_with_their_functions():
    async with (
        open_test_engine(make_config(MODULES)) as engine,
        connect_test_worker(engine) as worker,
    ):
        reply = await worker.call("engine::services::list", {})
        listed = by_id(reply["result"]["services"])
        expected = {
            "engine": "modules::worker::WorkerModule",
            "telemetry": "modules::telemetry::TelemetryModule",
            "state": "modules::state::StateModule",
            "stream": "modules::stream::StreamModule",
            "queue": "modules::queue::QueueModule",
            "cron": "modules::cron::CronModule",
            "pubsub": "modules::pubsub::PubSubModule",
            "kv_server": "modules::kv_server::KvServer",
        }
        for service_id, module in expected.items():
            assert listed[service_id]["owner"] == {"type": "module", "id": module}, service_id
            assert listed[service_id]["description"], service_id
        assert "state::set" in listed["state"]["functions"]
        assert "stream::set" in listed["stream"]["functions"]
        assert "kv_server::get" in listed["kv_server"]["functions"]
        assert "publish" in listed["pubsub"]["functions"]
        assert {"enqueue", "engine::queue::enqueue"} <= set(listed["queue"]["functions"])
        assert "engine::services::list" in listed["engine"]["functions"]
        # Every function is listed under exactly one service.
        grouped = [f for service in listed.values() for f in service["functions"]]
        assert len(grouped) == len(set(grouped))
        assert set(grouped) == {f for f in engine.registry.functions if "::" in f} | {
            "enqueue",
            "publish",
        }


async def test_registerservice_as_041_and_090_send_it_then_removed_with_the_worker():
    async with open_test_engine() as engine:
        async with connect_test_worker(engine) as old, connect_test_worker(engine) as new:
            # 0.4.1: no name; 0.9.0: name defaults to id on the SDK side.
            await old.send(
                {
                    "type": "registerservice",
                    "id": "svc041",
                    "description": "d",
                    "parent_service_id": "root",
                }
            )
            await old.send({"type": "registerservice", "id": "root"})
            await new.send({"type": "registerservice", "id": "svc090", "name": "Service 090"})
            await old.send({"type": "registerfunction", "id": "svc041::echo"})
            await new.send({"type": "registerfunction", "id": "svc090::echo"})
            await settle(lambda: {"svc041::echo", "svc090::echo"} <= set(engine.registry.functions))
            listed = by_id((await new.call("engine::services::list", {}))["result"]["services"])
            assert listed["svc041"] == {
                "id": "svc041",
                "name": "svc041",
                "description": "d",
                "parent_service_id": "root",
                "owner": {"type": "worker", "id": old.worker_id},
                "worker_ids": [old.worker_id],
                "implicit": False,
                "functions": ["svc041::echo"],
            }
            assert listed["root"]["functions"] == [] and listed["root"]["name"] == "root"
            assert listed["svc090"]["name"] == "Service 090"
            assert listed["svc090"]["owner"] == {"type": "worker", "id": new.worker_id}
            assert listed["svc090"]["functions"] == ["svc090::echo"]
            # engine::functions::list keeps its shape.
            functions = (await new.call("engine::functions::list", {}))["result"]["functions"]
            assert sorted(f["function_id"] for f in functions) == ["svc041::echo", "svc090::echo"]
            assert set(functions[0]) == {
                "function_id",
                "description",
                "request_format",
                "response_format",
                "metadata",
            }
            old_id = old.worker_id
        await settle(lambda: old_id not in engine.registry.workers and not engine.registry.workers)
        assert engine.registry.services.by_worker == {}
        assert {"svc041", "svc090", "root"}.isdisjoint(engine.registry.services.services)
        assert engine.registry.services.total_registrations == len(
            engine.registry.services.services
        )


async def test_hostile_registerservice_is_refused_or_dropped_and_the_engine_keeps_serving(caplog):
    caplog.set_level(logging.WARNING)
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        bad = [
            {"type": "registerservice", "id": 5},
            {"type": "registerservice", "id": ["a"]},
            {"type": "registerservice", "id": "a", "name": None},
            {"type": "registerservice", "id": "a", "description": {"x": 1}},
            {"type": "registerservice", "id": "a", "parent_service_id": 7},
            {"type": "registerservice"},
            {"type": "registerservice", "id": ""},
            {"type": "registerservice", "id": "huge\n" + "2001-01-01 FORGED\n" * 10_000},
            {"type": "registerservice", "id": "engine", "description": "taken over"},
        ]
        for message in bad:
            await worker.send(message)
        for index in range(MAX_SERVICES_PER_WORKER + 50):
            await worker.send({"type": "registerservice", "id": f"many{index}"})
        await worker.send({"type": "registerservice", "id": "last"})  # past the bound too
        reply = await worker.call("engine::services::list", {})
        listed = by_id(reply["result"]["services"])
        mine = [
            s for s in listed.values() if s["owner"] == {"type": "worker", "id": worker.worker_id}
        ]
        assert len(mine) == MAX_SERVICES_PER_WORKER
        assert "last" not in listed and "a" not in listed and "" not in listed
        assert listed["engine"]["owner"]["type"] == "module"
        assert listed["engine"]["description"] != "taken over"
        assert (
            sum(engine.registry.services.by_worker[worker.worker_id].values())
            <= MAX_SERVICE_BYTES_PER_WORKER
        )
        # Still serving this worker, and others.
        await worker.send({"type": "ping"})
        assert await worker.receive_type("pong") == {"type": "pong"}
        async with connect_test_worker(engine) as other:
            await other.send({"type": "registerservice", "id": "fine"})
            reply = await other.call("engine::services::list", {})
            assert "fine" in by_id(reply["result"]["services"])
    # Refusals were logged, each as one escaped, bounded line.
    # Rate-limited per connection: the first five are logged, the rest counted.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("malformed" in m and "registerservice" in m for m in messages) == 5
    assert any("more warnings like the last one were not logged" in m for m in messages)


async def test_a_refused_service_is_logged_on_one_escaped_bounded_line(caplog):
    caplog.set_level(logging.WARNING)
    forged = "huge\n2001-01-01 00:00:00,000 CRITICAL iii.engine: FORGED\r\u2028" * 2_000
    async with open_test_engine() as engine, connect_test_worker(engine) as worker:
        await worker.send({"type": "registerservice", "id": forged})
        await worker.send({"type": "registerservice", "id": "engine\nFORGED", "description": "x"})
        await worker.send({"type": "registerservice", "id": "engine", "description": "taken over"})
        await worker.call("engine::services::list", {})
        assert list(engine.registry.services.by_worker[worker.worker_id]) == ["engine\nFORGED"]
    lines = [LineFormatter().format(r) for r in caplog.records if "service" in r.getMessage()]
    assert len(lines) == 2, lines  # "engine\nFORGED" is accepted: ids are opaque strings
    assert "takes" in lines[0] and "belongs to an engine module" in lines[1]
    for line in lines:
        assert not any(sep in line for sep in ("\n", "\r", "\u2028"))
        assert len(line) < 1000


async def test_with_tokens_a_worker_registers_only_services_of_functions_it_may_register(
    monkeypatch,
):
    from tests.test_grants import AUTH, SPY, TOKENS
    from tests.test_security import raw_worker

    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)
    async with open_test_engine(make_config(auth=AUTH)) as engine:
        assert engine.listen_port is not None
        async with raw_worker(engine.listen_port, SPY) as spy:
            for service_id in ("spy", "spy::sub", "billing", "sp", "engine"):
                await spy.send({"type": "registerservice", "id": service_id})
            await spy.send({"type": "registerfunction", "id": "spy::fn"})
            await settle(lambda: "spy::fn" in engine.registry.functions)
            held = engine.registry.services.by_worker[spy.worker_id]
            assert sorted(held) == ["spy", "spy::sub"]
            assert "billing" not in engine.registry.services.services
