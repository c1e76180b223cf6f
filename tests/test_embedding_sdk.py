"""Official SDK workers (0.4.1 and 0.25.0) against an embedded engine: they list
and call its native functions, bind HTTP routes to them, and register triggers
of its native trigger types (which then fire their functions)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from iii import CallContext, EngineBuilder, IIIError, Trigger
from tests.sdk_workers import SCRIPTS, command
from tests.support import start_sdk_worker

pytestmark = pytest.mark.sdk

VERSIONS = ("0.4.1", "0.25.0")


async def greet(data: Any, ctx: CallContext) -> Any:
    if data.get("name") == "nobody":
        raise IIIError("nobody has no name", code="no_name")
    return {"greeting": f"hello {data['name']}", "caller": ctx.caller_worker_id}


async def hello_route(data: Any, ctx: CallContext) -> Any:
    return {"status_code": 200, "body": {"hello": data["path_params"]["name"]}}


class Ticker:
    """A native trigger type: remembers its triggers; the test fires them."""

    def __init__(self) -> None:
        self.triggers: dict[str, Trigger] = {}
        self.unregistered: list[str] = []
        self.changed = trio.Event()

    def register_trigger(self, trigger: Trigger) -> None:
        self.triggers[trigger.id] = trigger
        self.changed.set()

    def unregister_trigger(self, trigger: Trigger) -> None:
        del self.triggers[trigger.id]
        self.unregistered.append(trigger.function_id)
        self.changed.set()

    async def wait(self, predicate: Any) -> None:
        with trio.fail_after(20):
            while not predicate():
                self.changed = trio.Event()
                await self.changed.wait()


@pytest.mark.parametrize("version", VERSIONS)
async def test_sdk_worker_calls_native_functions_and_binds_them(version):
    ticker = Ticker()
    builder = (
        EngineBuilder()
        .free_ports()
        .function("native::greet", greet, description="Greets")
        .function("native::hello", hello_route)
        .trigger_type("native-ticker", ticker, description="ticks when the test says")
    )
    async with builder.open() as engine:
        async with start_sdk_worker(version, SCRIPTS[version], url=engine.url) as worker:
            await worker.wait_for("READY")

            # The native functions are listed to the SDK and callable by it.
            status, functions = await command(worker, op="functions")
            assert status == "OK" and {"native::greet", "native::hello"} <= set(functions)
            status, value = await command(
                worker, op="call", fn="native::greet", data={"name": "ada"}
            )
            assert status == "OK" and value["greeting"] == "hello ada"
            assert value["caller"] in engine._engine.connections
            status, error = await command(
                worker, op="call", fn="native::greet", data={"name": "nobody"}
            )
            assert (status, error) == ("ERR", {"code": "no_name", "message": "nobody has no name"})

            # An HTTP route the SDK binds to a native function.
            config = {"api_path": "hello/:name", "http_method": "GET"}
            assert await command(
                worker, op="trigger", type="http", fn="native::hello", config=config
            ) == (
                "OK",
                None,
            )
            routes = engine._engine.modules["rest_api"].routes
            with trio.fail_after(20):
                while not routes:
                    await trio.sleep(0.05)
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"{engine.rest_url}/hello/bob", timeout=10)
            assert (answer.status_code, answer.json()) == (200, {"hello": "bob"})

            # A trigger of the native trigger type, bound to the worker's function.
            assert await command(worker, op="register", id="sdk::on_tick") == ("OK", None)
            await engine.wait_for_function("sdk::on_tick")
            tick_config = {"every": "second"}
            assert await command(
                worker, op="trigger", type="native-ticker", fn="sdk::on_tick", config=tick_config
            ) == ("OK", None)
            await ticker.wait(lambda: ticker.triggers)
            (trigger,) = ticker.triggers.values()
            assert (trigger.function_id, trigger.config) == ("sdk::on_tick", tick_config)
            result = await trigger.fire({"tick": 1})
            assert result["echo"]["tick"] == 1
            await worker.wait_for("CALLED sdk::on_tick", contains='"tick": 1')
        # The worker left: its trigger is unregistered from the native type.
        await ticker.wait(lambda: not ticker.triggers)
        assert ticker.unregistered == ["sdk::on_tick"]
