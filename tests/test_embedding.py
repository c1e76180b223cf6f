"""The embedding API (the iii.embedding package): the builder's three
config sources and their errors, the lifetime and its bound ports, native
functions (called in-process, by a worker, by an HTTP trigger) and native
trigger types (registered and unregistered by workers, fired with grants).

SDK workers against native functions: tests/test_embedding_sdk.py; the pytest
plugin: tests/test_embedding_pytest.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import iii
from iii import CallContext, ConfigError, EngineBuilder, IIIError, Trigger
from iii.testing import connect_loopback_worker, connect_test_worker
from tests.test_security import raw_worker

REST = "modules::api::RestApiModule"
STATE = "modules::state::StateModule"


async def add(data: Any, ctx: CallContext) -> Any:
    return {"sum": data["a"] + data["b"], "caller": ctx.caller_worker_id}


async def explode(data: Any, ctx: CallContext) -> Any:
    raise RuntimeError("kaput")


async def refuse(data: Any, ctx: CallContext) -> Any:
    raise IIIError("not today", code="teapot")


async def barrier(worker: Any) -> None:
    """A round trip: the worker's earlier messages have been handled."""
    answer = await worker.call("engine::functions::list", {})
    assert "result" in answer


# -- the public surface ----------------------------------------------------------------


def test_import_iii_is_cheap_and_lists_the_public_names():
    # A fresh interpreter: importing iii loads neither trio nor the engine.
    code = (
        "import sys, iii; "
        "heavy = [m for m in ('trio', 'iii.engine', 'iii.embedding', 'iii.config') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for name in iii.__all__:
        assert getattr(iii, name) is not None
    with pytest.raises(AttributeError):
        iii.Engine  # noqa: B018 - the engine's internals are not public


# -- config: file, dict, calls -------------------------------------------------------------


def test_builder_calls_give_the_config_the_cli_would_run():
    config = (
        EngineBuilder()
        .host("127.0.0.1")
        .port(50123)
        .set("invocation_timeout_ms", 1234)
        .add_module(REST, {"port": 3999, "host": "127.0.0.1"})
        .adapter(STATE, "modules::state::adapters::KvStore", {"store_method": "in_memory"})
        .build_config()
    )
    assert (config.port, config.host, config.invocation_timeout) == (50123, "127.0.0.1", 1.234)
    classes = [entry.class_name for entry in config.modules]
    # Listed modules, in order, then the mandatory ones (as for a file).
    assert classes[:2] == [REST, STATE]
    assert {"modules::worker::WorkerModule", "modules::telemetry::TelemetryModule"} <= set(classes)
    assert "modules::queue::QueueModule" not in classes
    assert config.module_config(REST).port == 3999
    adapter = config.module_config(STATE).adapter
    assert adapter.class_name == "modules::state::adapters::KvStore"


def test_adapter_without_listed_modules_keeps_the_default_set():
    config = EngineBuilder().adapter(STATE, "modules::state::adapters::KvStore").build_config()
    classes = {entry.class_name for entry in config.modules}
    assert {REST, STATE, "modules::queue::QueueModule", "modules::cron::CronModule"} <= classes
    assert config.module_config(STATE).adapter.class_name == "modules::state::adapters::KvStore"
    # default_modules() after add_module(): the listed one plus every default.
    config = (
        EngineBuilder()
        .add_module("modules::observability::OtelModule")
        .default_modules()
        .build_config()
    )
    classes = [entry.class_name for entry in config.modules]
    assert classes[0] == "modules::observability::OtelModule" and REST in classes


def test_builder_from_a_file_and_from_a_dict(tmp_path):
    file = tmp_path / "engine.yaml"
    file.write_text(
        "port: ${EMBED_PORT:50200}\n"
        "modules:\n"
        "  - class: modules::api::RestApiModule\n"
        "    config: {port: 3777}\n"
    )
    config = EngineBuilder.from_file(file).host("127.0.0.2").build_config()
    assert (config.port, config.host) == (50200, "127.0.0.2")
    assert config.module_config(REST).port == 3777
    # ${VAR} expansion reads the builder's environment when one is given.
    config = EngineBuilder.from_file(file).environ({"EMBED_PORT": "50300"}).build_config()
    assert config.port == 50300

    data = {"port": 50400, "modules": [{"class": REST, "config": {"port": 3888}}]}
    config = EngineBuilder.from_dict(data).add_module(STATE).build_config()
    assert config.port == 50400
    assert [entry.class_name for entry in config.modules][:2] == [REST, STATE]
    assert data == {
        "port": 50400,
        "modules": [{"class": REST, "config": {"port": 3888}}],
    }  # not mutated


@pytest.mark.parametrize(
    ("builder", "key", "reason"),
    [
        (
            lambda: EngineBuilder().add_module(REST, {"prot": 1}),
            "modules[0].config",
            "unknown key: prot",
        ),
        (
            lambda: EngineBuilder().add_module("modules::nope::Nope"),
            "modules[0].class",
            "unknown module class",
        ),
        (lambda: EngineBuilder().port(70000), "port", "between 0 and 65535"),
        (
            lambda: EngineBuilder().set("invocation_timeout_ms", "soon"),
            "invocation_timeout_ms",
            "expected an integer",
        ),
        (lambda: EngineBuilder().set("colour", "blue"), None, "unknown key: colour"),
        (lambda: EngineBuilder.from_dict({"modules": "all"}), "modules", "expected a list"),
    ],
)
def test_a_bad_config_names_the_key(builder, key, reason):
    with pytest.raises(ConfigError) as caught:
        builder().build_config()
    # The message names the key (as the CLI prints it) and the reason.
    message = str(caught.value)
    assert message.startswith(f"{key}: ") if key else message.startswith(reason)
    assert reason in message


def test_a_bad_file_names_the_file_and_the_key(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text(
        "modules:\n  - class: modules::api::RestApiModule\n    config: {port: yes-please}\n"
    )
    with pytest.raises(ConfigError) as caught:
        EngineBuilder.from_file(file).build_config()
    assert (caught.value.file, caught.value.key) == (str(file), "modules[0].config.port")
    with pytest.raises(ConfigError) as caught:
        EngineBuilder.from_file(tmp_path / "missing.yaml")
    assert caught.value.reason == "file not found"
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        EngineBuilder.from_file(top_list)


def test_native_registrations_are_checked_when_made():
    builder = EngineBuilder().function("x::f", add)
    with pytest.raises(ValueError, match="registered twice"):
        builder.function("x::f", add)
    with pytest.raises(ValueError, match="empty"):
        builder.trigger_type("", _Recorder())
    with pytest.raises(ValueError, match="add_module"):
        builder.set("modules", [])


async def test_a_config_error_leaves_open_before_anything_runs():
    with pytest.raises(ConfigError):
        async with EngineBuilder().add_module(REST, {"port": "x"}).open():
            raise AssertionError("the block must not run")


async def test_a_native_function_clashing_with_a_module_function_stops_the_start():
    with pytest.RaisesGroup(
        pytest.RaisesExc(ValueError, match="'publish'"), flatten_subgroups=True
    ):
        async with EngineBuilder().free_ports().function("publish", add).open():
            raise AssertionError("the block must not run")


# -- lifetime and ports ---------------------------------------------------------------------------


async def test_open_yields_the_bound_ports_and_shuts_down_on_exit():
    builder = EngineBuilder().free_ports().function("math::add", add)
    async with builder.open() as engine:
        ports = engine.ports
        assert all(port and port > 0 for port in (ports.worker, ports.rest_api, ports.stream))
        assert ports.metrics is None  # the observability module is not listed
        assert engine.url == f"ws://127.0.0.1:{ports.worker}"
        assert engine.rest_url == f"http://127.0.0.1:{ports.rest_api}"
        # The ports are really bound: a worker connects, HTTP answers.
        async with connect_loopback_worker(engine._engine) as worker:
            assert worker.worker_id
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{engine.rest_url}/nothing-here", timeout=10)
        assert answer.status_code == 404
        stream = await trio.open_tcp_stream("127.0.0.1", ports.stream)
        await stream.aclose()
    # After the block the engine is gone: the worker port refuses.
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", ports.worker)


async def test_serve_in_the_callers_nursery():
    async with trio.open_nursery() as nursery:
        engine = await nursery.start(EngineBuilder().free_ports().function("math::add", add).serve)
        assert await engine.call("math::add", {"a": 2, "b": 3}) == {"sum": 5, "caller": None}
        engine.shutdown()  # serve returns, the nursery closes


async def test_two_engines_on_free_ports_side_by_side():
    async with (
        EngineBuilder().free_ports().open() as one,
        EngineBuilder().free_ports().open() as two,
    ):
        assert one.ports.worker != two.ports.worker
        assert one.ports.rest_api != two.ports.rest_api


# -- native functions ---------------------------------------------------------------------------


async def test_native_functions_in_process_listed_and_called_by_a_worker():
    builder = (
        EngineBuilder()
        .free_ports()
        .function("math::add", add, description="Adds a and b")
        .function("math::explode", explode)
        .function("math::refuse", refuse)
    )
    async with builder.open() as engine:
        assert await engine.call("math::add", {"a": 1, "b": 2}) == {"sum": 3, "caller": None}
        with pytest.raises(IIIError) as caught:
            await engine.call("math::explode", {})
        assert (caught.value.code, caught.value.message) == ("invocation_failed", "kaput")
        with pytest.raises(IIIError) as caught:
            await engine.call("math::refuse", {})
        assert (caught.value.code, caught.value.message) == ("teapot", "not today")
        with pytest.raises(IIIError) as caught:
            await engine.call("math::missing", {})
        assert caught.value.code == "function_not_found"

        listed = await engine.call("engine::functions::list", {})
        by_id = {f["function_id"]: f for f in listed["functions"]}
        assert by_id["math::add"]["description"] == "Adds a and b"
        assert "math::explode" in by_id

        async with connect_test_worker(engine._engine) as worker:
            answer = await worker.call("math::add", {"a": 20, "b": 22})
            assert answer["result"] == {"sum": 42, "caller": worker.worker_id}
            answer = await worker.call("math::explode", {})
            assert answer["error"] == {"code": "invocation_failed", "message": "kaput"}
            # A worker cannot take a native function's id over.
            await worker.send({"type": "registerfunction", "id": "math::add"})
            answer = await worker.call("math::add", {"a": 1, "b": 1})
            assert answer["result"]["sum"] == 2 and answer["result"]["caller"] == worker.worker_id
            assert engine._engine.registry.functions["math::add"].replicas.keys() == {None}


async def test_functions_registered_after_start_and_removed():
    async with EngineBuilder().free_ports().open() as engine:
        engine.register_function("late::add", add)
        with pytest.raises(ValueError, match="already registered"):
            engine.register_function("late::add", add)
        async with connect_test_worker(engine._engine) as worker:
            answer = await worker.call("late::add", {"a": 1, "b": 1})
            assert answer["result"]["sum"] == 2
            engine.unregister_function("late::add")
            answer = await worker.call("late::add", {"a": 1, "b": 1})
            assert answer["error"]["code"] == "function_not_found"


async def test_a_native_function_behind_an_http_trigger():
    async def hello(data: Any, ctx: CallContext) -> Any:
        name = data["path_params"]["name"]
        return {"status_code": 201, "body": {"hello": name, "q": data["query_params"].get("q")}}

    builder = EngineBuilder().free_ports().function("web::hello", hello)
    async with builder.open() as engine, httpx.AsyncClient() as client:
        trigger_id = engine.register_trigger(
            "http", "web::hello", {"api_path": "hello/:name", "http_method": "GET"}
        )
        answer = await client.get(f"{engine.rest_url}/hello/ada?q=1", timeout=10)
        assert (answer.status_code, answer.json()) == (201, {"hello": "ada", "q": "1"})
        # A worker's trigger reaches the native function as well.
        async with connect_test_worker(engine._engine) as worker:
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": "w-route",
                    "trigger_type": "http",
                    "function_id": "web::hello",
                    "config": {"api_path": "hi/:name", "http_method": "GET"},
                }
            )
            await barrier(worker)  # only a refusal is answered
            assert not [m for m in worker.backlog if m["type"] == "triggerregistrationresult"]
            answer = await client.get(f"{engine.rest_url}/hi/bob", timeout=10)
            assert answer.json() == {"hello": "bob", "q": None}
        engine.unregister_trigger(trigger_id)
        answer = await client.get(f"{engine.rest_url}/hello/ada", timeout=10)
        assert answer.status_code == 404
        with pytest.raises(IIIError) as caught:
            engine.register_trigger("http", "web::hello", {"http_method": "GET"})
        assert caught.value.code


# -- native trigger types --------------------------------------------------------------------------


class _Recorder:
    """A native trigger type that records its triggers and refuses config {"bad": true}."""

    def __init__(self) -> None:
        self.live: dict[str, Trigger] = {}
        self.events: list[tuple[str, str, Any]] = []
        self.changed = trio.Event()

    def register_trigger(self, trigger: Trigger) -> None:
        if isinstance(trigger.config, dict) and trigger.config.get("bad"):
            raise IIIError("bad is not allowed", code="invalid_config")
        self.live[trigger.id] = trigger
        self.events.append(("+", trigger.function_id, trigger.config))
        self.changed.set()

    def unregister_trigger(self, trigger: Trigger) -> None:
        assert self.live.pop(trigger.id) is trigger  # the same object as registered
        self.events.append(("-", trigger.function_id, trigger.config))
        self.changed.set()

    async def next_event(self) -> tuple[str, str, Any]:
        with trio.fail_after(10):
            while not self.events:
                self.changed = trio.Event()
                await self.changed.wait()
        return self.events.pop(0)


async def test_a_native_trigger_type_gets_workers_triggers_and_fires_them():
    recorder = _Recorder()
    builder = EngineBuilder().free_ports().trigger_type("ticker", recorder, description="ticks")
    async with builder.open() as engine:
        async with connect_test_worker(engine._engine) as worker:
            await worker.send({"type": "registerfunction", "id": "w::tick"})
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": "t1",
                    "trigger_type": "ticker",
                    "function_id": "w::tick",
                    "config": {"every": 5},
                }
            )
            assert await recorder.next_event() == ("+", "w::tick", {"every": 5})
            trigger = recorder.live["t1"]
            assert (trigger.trigger_type, trigger.metadata) == ("ticker", None)

            async def answer_one() -> None:
                call = await worker.receive_type("invokefunction")
                assert call["function_id"] == "w::tick" and call["data"] == {"n": 1}
                await worker.send(
                    {
                        "type": "invocationresult",
                        "invocation_id": call["invocation_id"],
                        "function_id": "w::tick",
                        "result": {"ticked": True},
                    }
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_one)
                assert await trigger.fire({"n": 1}) == {"ticked": True}

            # Refused by the handler: the worker gets the handler's code.
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": "t2",
                    "trigger_type": "ticker",
                    "function_id": "w::tick",
                    "config": {"bad": True},
                }
            )
            result = await worker.receive_type("triggerregistrationresult")
            assert result["error"]["code"] == "invalid_config"
            assert "t2" not in recorder.live

            await worker.send({"type": "unregistertrigger", "id": "t1", "trigger_type": "ticker"})
            assert await recorder.next_event() == ("-", "w::tick", {"every": 5})
            with pytest.raises(IIIError) as caught:
                await trigger.fire({"n": 2})  # a handler that kept it cannot fire it any more
            assert caught.value.code == "trigger_not_found"

            # A worker that leaves takes its triggers with it.
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": "t3",
                    "trigger_type": "ticker",
                    "function_id": "w::tick",
                    "config": {"every": 7},
                }
            )
            assert await recorder.next_event() == ("+", "w::tick", {"every": 7})
        assert await recorder.next_event() == ("-", "w::tick", {"every": 7})
        assert recorder.live == {}
        types = await engine.call("engine::triggers::list", {})
        assert isinstance(types, dict)


async def test_a_trigger_registered_before_its_native_type_is_handed_over():
    async with EngineBuilder().free_ports().open() as engine:
        async with connect_test_worker(engine._engine) as worker:
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": "early",
                    "trigger_type": "later",
                    "function_id": "any::fn",
                    "config": {"k": 1},
                }
            )
            await barrier(worker)  # the trigger waits for its type
            recorder = _Recorder()
            engine.register_trigger_type("later", recorder)
            assert await recorder.next_event() == ("+", "any::fn", {"k": 1})
        with pytest.raises(ValueError, match="already provides"):
            engine.register_trigger_type("http", _Recorder())


# -- the thread ------------------------------------------------------------------------------------


def test_run_in_thread_for_synchronous_code():
    with EngineBuilder().free_ports().function("math::add", add).run_in_thread() as engine:
        assert engine.ports.worker > 0 and engine.url.endswith(f":{engine.ports.worker}")
        assert engine.call("math::add", {"a": 4, "b": 5}) == {"sum": 9, "caller": None}
        with pytest.raises(IIIError) as caught:
            engine.call("nope::missing")
        assert caught.value.code == "function_not_found"
        engine.wait_for_function("math::add", timeout=5)
        with pytest.raises(trio.TooSlowError):
            engine.wait_for_function("never::there", timeout=0.2)
        with httpx.Client() as client:
            engine.register_trigger("http", "math::add", {"api_path": "add", "http_method": "POST"})
            answer = client.post(f"{engine.rest_url}/add", json={"a": 1}, timeout=10)
        # The REST payload is not {a, b}: the native function's KeyError is a 500.
        assert answer.status_code == 500
        port = engine.ports.worker
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(RuntimeError):
        engine.ports  # noqa: B018 - not running any more


def test_run_in_thread_raises_a_config_error_at_start():
    with pytest.raises(ConfigError) as caught:
        with EngineBuilder().add_module(REST, {"port": "x"}).run_in_thread():
            raise AssertionError("the block must not run")
    assert caught.value.key == "modules[0].config.port"


def test_a_thread_that_did_not_start_in_time_stops_by_itself():
    engine = EngineBuilder().free_ports().run_in_thread(start_timeout=0)
    with pytest.raises(TimeoutError):
        engine.__enter__()
    assert engine._thread is not None
    engine._thread.join(60)  # the engine started later, saw it was abandoned, and stopped
    assert not engine._thread.is_alive()
    assert engine._error is None


def test_python_m_iii_still_serves_its_commands(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("modules: []\n")
    out = subprocess.run(
        [sys.executable, "-m", "iii", "check-config", str(file)], capture_output=True, text=True
    )
    assert (out.returncode, out.stdout.strip()) == (0, f"{file}: ok")
    out = subprocess.run(
        [sys.executable, "-m", "iii", "config", "show", "-c", str(file), "--format", "yaml"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "modules::worker::WorkerModule" in out.stdout


# -- the README's examples ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def readme_examples() -> list[str]:
    """The Python blocks of the README's embedding section, dedented."""
    text = (ROOT / "README.rst").read_text()
    section = text[text.index("Embedding the engine in a Python program") :]
    section = section[: section.index("\nConfiguration\n-------------")]
    blocks = []
    for part in section.split(".. code-block:: python\n\n")[1:]:
        lines = []
        for line in part.splitlines():
            if line and not line.startswith("    "):
                break
            lines.append(line[4:])
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


def test_the_readme_program_runs_and_is_typed(tmp_path):
    program = tmp_path / "program.py"
    program.write_text(readme_examples()[0])
    out = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "III_URL = ws://127.0.0.1:" in out.stdout
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert checked.returncode == 0, checked.stdout


def test_the_readme_pytest_example_is_the_sample_project():
    sample = (ROOT / "tests" / "embedding_sample" / "test_greeter.py").read_text()
    assert readme_examples()[1] in sample


# -- tokens ----------------------------------------------------------------------------------------

ADMIN_SECRET = "embedding-admin-0000000"
SPY_SECRET = "embedding-spy-000000000"
AUTH = {
    "tokens": [
        {"name": "admin", "env": "EMBED_ADMIN"},
        {
            "name": "spy",
            "env": "EMBED_SPY",
            "register": ["spy::*"],
            "invoke": ["spy::*"],
            "trigger_types": ["ticker"],
        },
    ]
}


async def test_a_workers_token_applies_to_native_functions_and_trigger_types():
    recorder = _Recorder()
    builder = (
        EngineBuilder()
        .free_ports()
        .set("auth", AUTH)
        .environ({"EMBED_ADMIN": ADMIN_SECRET, "EMBED_SPY": SPY_SECRET})
        .function("native::secret", add)
        .trigger_type("ticker", recorder)
    )
    async with builder.open() as engine:
        port = engine.ports.worker
        async with raw_worker(port, SPY_SECRET) as spy, raw_worker(port, ADMIN_SECRET) as admin:
            answer = await spy.call("native::secret", {"a": 1, "b": 1})
            assert answer["error"]["code"] == "forbidden"
            answer = await admin.call("native::secret", {"a": 1, "b": 1})
            assert answer["result"]["sum"] == 2

            # Binding the native function to a native trigger is refused too,
            # before the trigger type's handler hears of it.
            bind = {"type": "registertrigger", "trigger_type": "ticker", "config": {}}
            await spy.send({**bind, "id": "t-secret", "function_id": "native::secret"})
            result = await spy.receive_type("triggerregistrationresult")
            assert result["error"]["code"] == "forbidden"
            await spy.send({"type": "registerfunction", "id": "spy::own"})
            await spy.send({**bind, "id": "t-own", "function_id": "spy::own"})
            assert await recorder.next_event() == ("+", "spy::own", {})
            assert list(recorder.live) == ["t-own"]
        # The engine's own calls need no token.
        assert (await engine.call("native::secret", {"a": 2, "b": 2}))["sum"] == 4


# -- the plugin's fixtures, in this repo's own run (pytest-trio, trio_mode) ------------------------


async def test_the_iii_engine_fixture(iii_engine):
    assert iii_engine.ports.worker > 0 and iii_engine.ports.rest_api
    async with connect_loopback_worker(iii_engine._engine) as worker:
        await worker.send({"type": "registerfunction", "id": "fixture::fn"})
        with trio.fail_after(10):
            await iii_engine.wait_for_function("fixture::fn")


def test_the_iii_engine_thread_fixture(iii_engine_thread):
    listed = iii_engine_thread.call("engine::functions::list", {"include_internal": True})
    assert "engine::functions::list" in {f["function_id"] for f in listed["functions"]}
