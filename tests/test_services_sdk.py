"""``registerservice`` from the real SDKs (0.4.1 and 0.9.0), read back with ``engine::services::list``.

0.4.1's ``register_service(id, description, parent_id)`` sends no ``name``;
0.9.0's ``register_service({"id", "name"?, ...})`` sends ``name`` (the id when
not given).  Both replay their services when they reconnect.  0.25.0 has no
``register_service``.
"""

from __future__ import annotations

import pytest
import trio

from iii.testing import open_test_engine
from tests.sdk_workers import SCRIPTS, command
from tests.support import start_sdk_worker

pytestmark = pytest.mark.sdk


async def settle(predicate, timeout=20.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def by_id(listing):
    return {service["id"]: service for service in listing}


SERVICE_041 = {"op": "service", "id": "billing", "description": "Billing (0.4.1)", "parent": "shop"}
SERVICE_090 = {
    "op": "service",
    "id": "shop",
    "name": "The shop",
    "description": "Shop (0.9.0)",
}


async def test_041_and_090_register_services_listed_by_both_and_removed_on_disconnect():
    async with open_test_engine() as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker("0.4.1", SCRIPTS["0.4.1"], url=url, args=("w041",)) as old:
            async with start_sdk_worker("0.9.0", SCRIPTS["0.9.0"], url=url, args=("w090",)) as new:
                await old.wait_for("READY")
                await new.wait_for("READY")
                assert await command(old, **SERVICE_041) == ("OK", None)
                assert await command(old, op="service", id="bare041") == ("OK", None)
                assert await command(new, **SERVICE_090) == ("OK", None)
                assert await command(new, op="service", id="bare090") == ("OK", None)
                assert await command(old, op="register", id="billing::charge") == ("OK", None)
                assert await command(new, op="register", id="shop::order") == ("OK", None)
                # The sub-service layout of 0.9.0's register_service docstring.
                refunds = {"id": "shop::refunds", "parent_service_id": "shop"}
                assert await command(new, op="service", **refunds) == ("OK", None)
                assert await command(new, op="register", id="shop::refunds::create") == ("OK", None)
                services = engine.registry.services.services
                await settle(
                    lambda: (
                        {"billing", "bare041", "shop", "bare090"} <= set(services)
                        and "shop::refunds" in services
                        and {"billing::charge", "shop::order", "shop::refunds::create"}
                        <= set(engine.registry.functions)
                    )
                )
                old_id = next(iter(engine.registry.services.services["billing"].registrations))
                new_id = next(iter(engine.registry.services.services["shop"].registrations))
                for worker in (old, new):
                    status, listing = await command(worker, op="services")
                    assert status == "OK"
                    listed = by_id(listing)
                    assert listed["billing"] == {
                        "id": "billing",
                        "name": "billing",  # 0.4.1 sends no name: the id
                        "description": "Billing (0.4.1)",
                        "parent_service_id": "shop",
                        "owner": {"type": "worker", "id": old_id},
                        "worker_ids": [old_id],
                        "implicit": False,
                        "functions": ["billing::charge"],
                    }
                    assert listed["shop"]["name"] == "The shop"
                    assert listed["shop"]["owner"] == {"type": "worker", "id": new_id}
                    assert listed["shop"]["functions"] == ["shop::order"]
                    assert listed["shop::refunds"]["parent_service_id"] == "shop"
                    assert listed["shop::refunds"]["name"] == "shop::refunds"
                    assert listed["shop::refunds"]["functions"] == ["shop::refunds::create"]
                    assert listed["bare041"]["name"] == "bare041"
                    assert listed["bare041"]["description"] is None
                    assert listed["bare090"]["name"] == "bare090"
                    assert listed["engine"]["owner"]["type"] == "module"
                    # engine::functions::list still parses in both SDKs.
                    status, functions = await command(worker, op="functions")
                    assert status == "OK" and {"billing::charge", "shop::order"} <= set(functions)
                # Dropped by the engine, each SDK reconnects and replays its
                # services under its new worker id.
                for worker_id in (old_id, new_id):
                    engine.connections[worker_id].abort("test: dropped")
                await settle(lambda: old_id not in engine.registry.workers)
                await settle(
                    lambda: (
                        {"billing", "shop"} <= set(services)
                        and old_id not in services["billing"].registrations
                        and new_id not in services["shop"].registrations
                    )
                )
                old_id = next(iter(services["billing"].registrations))
                new_id = next(iter(services["shop"].registrations))
                assert {old_id, new_id} <= set(engine.connections)
                listed = by_id((await command(new, op="services"))[1])
                assert listed["billing"]["parent_service_id"] == "shop"
                assert listed["shop"]["name"] == "The shop"
            await settle(lambda: new_id not in engine.registry.workers)
            assert {"shop", "shop::refunds", "bare090"}.isdisjoint(
                engine.registry.services.services
            )
            assert {"billing", "bare041"} <= set(engine.registry.services.services)
        await settle(lambda: old_id not in engine.registry.workers)
        assert {"billing", "bare041"}.isdisjoint(engine.registry.services.services)
        assert engine.registry.services.by_worker == {}
