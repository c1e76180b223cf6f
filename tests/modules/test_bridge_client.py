"""BridgeClient (``modules::bridge_client::BridgeClientModule``): two real engines.

An *edge* engine runs the module and links to a *backend* engine; both run in
the test process on real sockets, with official SDK workers (0.4.1 and
0.25.0) on each side as child processes.  The hostile remotes are the fake
servers of ``tests/test_link.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from trio_websocket import WebSocketConnection

from iii.config import parse_config
from iii.engine import Engine
from iii.errors import ConfigError, IIIError
from iii.grants import Grant
from iii.native import CallContext
from iii.testing import make_config, open_test_engine
from tests.sdk_workers import SCRIPTS, command
from tests.support import ROOT, EngineProcess, SdkWorker, free_port, start_sdk_worker
from tests.test_link import fake_remote, result_for

BRIDGE = "modules::bridge_client::BridgeClientModule"
OTEL = "modules::observability::OtelModule"
FAST = {"backoff_initial_ms": 20, "backoff_max_ms": 200, "connect_timeout_ms": 5000}
TOKEN = "backend-token-0123456789abcdef"


def bridge_entry(url: str, **keys: Any) -> dict[str, Any]:
    return {"class": BRIDGE, "config": {"url": url, **FAST, **keys}}


def engine_config(modules: list[dict[str, Any]], port: int = 0, **keys: Any) -> Any:
    return attrs.evolve(make_config(modules=modules, **keys), port=port)


def url_of(engine: Engine) -> str:
    return f"ws://127.0.0.1:{engine.listen_port}"


def bridge_of(engine: Engine, name: str | None = None) -> Any:
    modules = [m for key, m in engine.modules.items() if key.startswith("bridge_client:")]
    if name is not None:
        modules = [m for m in modules if m.config.name == name]
    assert len(modules) == 1, list(engine.modules)
    return modules[0]


async def wait_functions(engine: Engine, *function_ids: str) -> None:
    changed = trio.Event()

    def listener() -> None:
        changed.set()

    engine.function_listeners.append(listener)
    try:
        with trio.fail_after(30):
            while not all(f in engine.registry.functions for f in function_ids):
                await changed.wait()
                changed = trio.Event()
    finally:
        engine.function_listeners.remove(listener)


@asynccontextmanager
async def sdk_pair(url: str, prefix: str) -> AsyncIterator[tuple[SdkWorker, SdkWorker]]:
    """A 0.4.1 and a 0.25.0 worker on the engine at ``url``, both ready."""
    async with start_sdk_worker(
        "0.4.1", SCRIPTS["0.4.1"], url=url, args=(f"{prefix}-041",)
    ) as old, start_sdk_worker(
        "0.25.0", SCRIPTS["0.25.0"], url=url, args=(f"{prefix}-025",)
    ) as new:  # fmt: skip
        await old.wait_for("READY", timeout=60)
        await new.wait_for("READY", timeout=60)
        yield old, new


# -- config ------------------------------------------------------------------------------


def test_config_keys_defaults_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_URL", "ws://backend.example:4000")
    config = parse_config({"modules": [{"class": BRIDGE}]})
    module_config = config.module_config(BRIDGE)
    assert module_config.effective_url() == "ws://backend.example:4000"
    assert module_config.name == "backend.example:4000"
    monkeypatch.delenv("III_URL")
    config = parse_config({"modules": [{"class": BRIDGE, "config": {"service_id": "svc"}}]})
    assert config.module_config(BRIDGE).effective_url() == "ws://0.0.0.0:49134"
    assert config.module_config(BRIDGE).name == "svc"

    def refused(config: dict[str, Any], file: str | None = "edge.yaml") -> ConfigError:
        with pytest.raises(ConfigError) as info:
            parse_config({"modules": config}, file=file)
        return info.value

    error = refused([{"class": BRIDGE, "config": {"urll": "ws://x"}}])
    assert (error.file, error.key) == ("edge.yaml", "modules[0].config")
    assert "urll" in str(error)
    error = refused([{"class": BRIDGE, "config": {"url": "http://x"}}])
    assert "ws://" in str(error) and error.key == "modules[0].config.url"  # the full key path
    error = refused([{"class": BRIDGE, "config": {"expose": [{"remote_function": "x"}]}}])
    assert "expose" in str(error) and "local_function" in str(error)
    error = refused([{"class": BRIDGE, "config": {"token_env": "III_TEST_NOT_SET_ANYWHERE"}}])
    assert "token_env" in str(error)
    error = refused(
        [
            bridge_entry("ws://a:1", forward=[{"local_function": "x", "remote_function": "y"}]),
            bridge_entry("ws://b:1", forward=[{"local_function": "x", "remote_function": "z"}]),
        ]
    )
    assert error.key == "modules[1].config.forward[0].local_function"
    assert "modules[0].config.forward[0].local_function" in str(error)
    error = refused([bridge_entry("ws://a:1", name="n"), bridge_entry("ws://b:1", name="n")])
    assert error.key == "modules[1].config.name"

    # Several entries, one per remote, named uniquely.
    config = parse_config(
        {"modules": [bridge_entry("ws://a:1"), bridge_entry("ws://a:1"), bridge_entry("ws://b:2")]}
    )
    names = [entry.config.name for entry in config.modules if entry.class_name == BRIDGE]
    assert names == ["a:1", "a:1-2", "b:2"]


def test_check_config_names_the_file_and_key_and_exits_two(tmp_path: Path) -> None:
    bad = tmp_path / "edge.yaml"
    bad.write_text(
        f"modules:\n  - class: {BRIDGE}\n    config:\n      url: ws://x:1\n"
        "      forward:\n        - local_function: a\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "iii", "check-config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert str(bad) in result.stderr and "modules[0].config" in result.stderr
    assert "remote_function" in result.stderr


# -- two engines, SDK workers on each side ---------------------------------------------


async def test_expose_forward_invoke_with_sdk_workers_on_both_sides() -> None:
    async with open_test_engine(engine_config([])) as backend:
        bridge = bridge_entry(
            url_of(backend),
            service_id="edge-bridge",
            service_name="Edge bridge",
            expose=[
                {"local_function": "edge::echo041"},
                {"local_function": "edge::echo025", "remote_function": "fromedge::echo025"},
                {"local_function": "edge::fail"},
            ],
            forward=[
                {"local_function": "remote::echo025", "remote_function": "backend::echo025"},
                {"local_function": "remote::echo041", "remote_function": "backend::echo041",
                 "timeout_ms": 20000},
                {"local_function": "remote::fail", "remote_function": "backend::fail"},
            ],
        )  # fmt: skip
        async with open_test_engine(engine_config([bridge])) as edge:
            module = bridge_of(edge)
            assert await module.link.wait_connected(15)
            async with (
                sdk_pair(url_of(backend), "backend") as (b041, b025),
                sdk_pair(url_of(edge), "edge") as (e041, e025),
            ):
                assert await command(b025, op="register", id="backend::echo025") == ("OK", None)
                assert await command(b041, op="register", id="backend::echo041") == ("OK", None)
                assert await command(b041, op="register", id="backend::fail", kind="fail") == (
                    "OK",
                    None,
                )
                assert await command(e041, op="register", id="edge::echo041") == ("OK", None)
                assert await command(e025, op="register", id="edge::echo025") == ("OK", None)
                assert await command(e025, op="register", id="edge::fail", kind="fail") == (
                    "OK",
                    None,
                )
                await wait_functions(
                    backend, "backend::echo025", "backend::echo041", "backend::fail"
                )
                await wait_functions(edge, "edge::echo041", "edge::echo025", "edge::fail")
                # Exposed on the backend, served by the edge's workers.
                await wait_functions(backend, "edge::echo041", "fromedge::echo025", "edge::fail")

                # The service, on the backend, owned by the link's worker.
                worker = [w for w in backend.registry.workers.values() if w.name == "Edge bridge"]
                assert len(worker) == 1

                # Exposed function called from the remote side (both SDKs calling).
                status, value = await command(b025, op="call", fn="edge::echo041", data={"a": 1})
                assert (status, value["by"], value["echo"]["a"]) == ("OK", "0.4.1", 1)
                # The backend caller's worker id does not reach the edge's function.
                assert "_caller_worker_id" not in value["echo"]
                status, value = await command(b041, op="call", fn="fromedge::echo025", data=[1])
                assert (status, value["by"], value["echo"]) == ("OK", "0.25.0", [1])
                status, error = await command(b025, op="call", fn="edge::fail", data={})
                assert (status, error) == ("ERR", {"code": "invocation_failed", "message": "boom!"})

                # Forwarded functions called from the local side.
                status, value = await command(e041, op="call", fn="remote::echo025", data={"b": 2})
                assert (status, value["by"], value["echo"]["b"]) == ("OK", "0.25.0", 2)
                status, value = await command(e025, op="call", fn="remote::echo041", data="s")
                assert (status, value["by"], value["echo"]) == ("OK", "0.4.1", "s")
                status, error = await command(e025, op="call", fn="remote::fail", data={})
                assert (status, error) == ("ERR", {"code": "invocation_failed", "message": "boom!"})

                # bridge.invoke and bridge.invoke_async.
                status, value = await command(
                    e025,
                    op="call",
                    fn="bridge.invoke",
                    data={"function_id": "backend::echo041", "data": {"c": 3}, "timeout_ms": 10000},
                )
                assert (status, value["by"], value["echo"]["c"]) == ("OK", "0.4.1", 3)
                status, value = await command(
                    e041, op="call", fn="bridge.invoke", data={"function_id": "backend::echo025"}
                )
                assert (status, value["by"]) == ("OK", "0.25.0")
                status, error = await command(
                    e041, op="call", fn="bridge.invoke", data={"function_id": "nope::missing"}
                )
                assert (status, error["code"]) == ("ERR", "function_not_found")
                status, error = await command(e025, op="call", fn="bridge.invoke", data={"x": 1})
                assert (status, error["code"]) == ("ERR", "deserialization_error")
                status, value = await command(
                    e041,
                    op="call",
                    fn="bridge.invoke_async",
                    data={"function_id": "backend::echo025", "data": {"v": "async"}},
                )
                assert status == "OK"
                await b025.wait_for("CALLED backend::echo025", contains='"v": "async"')
                status, value = await command(
                    e025,
                    op="call",
                    fn="bridge.invoke_async",
                    data={"function_id": "backend::echo041", "data": {"v": "async2"}},
                )
                assert status == "OK"
                await b041.wait_for("CALLED backend::echo041", contains='"v": "async2"')


async def test_remote_restart_survived_and_calls_fail_at_once_while_down() -> None:
    port = free_port()
    backend_url = f"ws://127.0.0.1:{port}"
    bridge = bridge_entry(
        backend_url,
        expose=[{"local_function": "edge::echo025"}],
        forward=[{"local_function": "remote::echo", "remote_function": "backend::echo"}],
    )
    async with open_test_engine(engine_config([bridge])) as edge:
        module = bridge_of(edge)
        async with sdk_pair(url_of(edge), "edge") as (e041, e025):
            assert await command(e025, op="register", id="edge::echo025") == ("OK", None)
            await wait_functions(edge, "edge::echo025")

            async def backend_echo(data: Any, ctx: CallContext) -> Any:
                return {"backend": data}

            async with open_test_engine(engine_config([], port=port)) as first:
                first.register_function("backend::echo", backend_echo)
                assert await module.link.wait_connected(15)
                await wait_functions(first, "edge::echo025")
                status, value = await command(e041, op="call", fn="remote::echo", data=1)
                assert (status, value) == ("OK", {"backend": 1})
                first.request_shutdown()
                assert await module.link.wait_disconnected(15)

            # Down: the call fails at once, long before its timeout.
            timeout_passed = trio.Event()

            async def sentinel() -> None:
                await trio.sleep(120)
                timeout_passed.set()

            answers: list[tuple[str, Any]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sentinel)
                answers.append(
                    await command(
                        e025,
                        op="call",
                        fn="bridge.invoke",
                        data={"function_id": "backend::echo", "timeout_ms": 120_000},
                        timeout=120,
                    )
                )
                answers.append(await command(e041, op="call", fn="remote::echo", timeout=120))
                nursery.cancel_scope.cancel()
            assert not timeout_passed.is_set()
            for status, error in answers:
                assert (status, error["code"]) == ("ERR", "bridge_unavailable")

            # The backend comes back (a new engine on the same port): everything works again.
            async with open_test_engine(engine_config([], port=port)) as second:
                second.register_function("backend::echo", backend_echo)
                assert await module.link.wait_connected(15)
                await wait_functions(second, "edge::echo025")
                status, value = await command(e041, op="call", fn="remote::echo", data=2)
                assert (status, value) == ("OK", {"backend": 2})
                assert await second.invoke("edge::echo025", {"d": 4}) == {
                    "echo": {"d": 4},
                    "by": "0.25.0",
                }


async def test_trace_id_is_shared_across_the_bridge() -> None:
    otel = {"class": OTEL, "config": {"enabled": True, "exporter": "memory"}}
    async with open_test_engine(engine_config([otel])) as backend:
        bridge = bridge_entry(
            url_of(backend),
            expose=[{"local_function": "edge::echo"}],
            forward=[{"local_function": "remote::echo", "remote_function": "backend::echo"}],
        )
        async with open_test_engine(engine_config([otel, bridge])) as edge:
            assert await bridge_of(edge).link.wait_connected(15)
            async with start_sdk_worker(
                "0.25.0", SCRIPTS["0.25.0"], url=url_of(backend), args=("b025",)
            ) as b025, start_sdk_worker(
                "0.4.1", SCRIPTS["0.4.1"], url=url_of(edge), args=("e041",)
            ) as e041:  # fmt: skip
                await b025.wait_for("READY", timeout=60)
                await e041.wait_for("READY", timeout=60)
                assert await command(b025, op="register", id="backend::echo") == ("OK", None)
                assert await command(e041, op="register", id="edge::echo") == ("OK", None)
                await wait_functions(backend, "backend::echo", "edge::echo")

                # edge -> backend: the forwarded call.
                status, _ = await command(e041, op="call", fn="remote::echo", data={})
                assert status == "OK"
                edge_trace = await trace_of(edge, "call remote::echo")
                assert "call backend::echo" in await span_names(backend, edge_trace)

                # backend -> edge: the exposed function.
                status, _ = await command(b025, op="call", fn="edge::echo", data={})
                assert status == "OK"
                backend_trace = await trace_of(backend, "call edge::echo")
                assert backend_trace != edge_trace
                assert "call edge::echo" in await span_names(edge, backend_trace)


async def trace_of(engine: Engine, span_name: str) -> str:
    listed = await engine.invoke(
        "engine::traces::list", {"name": span_name, "include_internal": True}
    )
    trace_ids = {span["trace_id"] for span in listed["spans"]}
    assert len(trace_ids) == 1, listed
    return trace_ids.pop()


async def span_names(engine: Engine, trace_id: str) -> set[str]:
    tree = await engine.invoke("engine::traces::tree", {"trace_id": trace_id})
    names: set[str] = set()

    def walk(nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            names.add(node["name"])
            walk(node.get("children", []))

    walk(tree["roots"])
    return names


@pytest.fixture
def backend_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_TEST_BACKEND_TOKEN", TOKEN)
    monkeypatch.setenv("III_TEST_EDGE_ADMIN", "edge-admin-0123456789abcdef")
    monkeypatch.setenv("III_TEST_EDGE_BRIDGE", "edge-bridge-0123456789abcdef")


async def test_token_tls_and_the_grant_of_calls_from_the_remote(
    backend_token: None, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {name: str(tmp_path / f"{name}.pem") for name in ("cert", "key", "ca")}
    cert.private_key_and_cert_chain_pem.write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["ca"])
    backend_config = engine_config(
        [],
        auth={"tokens": [{"name": "edge", "env": "III_TEST_BACKEND_TOKEN"}]},
        tls={"cert": files["cert"], "key": files["key"]},
    )
    async with open_test_engine(backend_config) as backend:

        async def backend_echo(data: Any, ctx: CallContext) -> Any:
            return {"backend": data}

        backend.register_function("backend::echo", backend_echo)
        bridge = bridge_entry(
            f"wss://localhost:{backend.listen_port}",
            token_env="III_TEST_BACKEND_TOKEN",
            ca_file=files["ca"],
            grant="bridge",
            expose=[{"local_function": "edge::open"}, {"local_function": "secret::fn"}],
            forward=[{"local_function": "remote::echo", "remote_function": "backend::echo"}],
        )
        edge_config = engine_config(
            [bridge],
            auth={
                "tokens": [
                    {"name": "admin", "env": "III_TEST_EDGE_ADMIN"},
                    {"name": "bridge", "env": "III_TEST_EDGE_BRIDGE", "invoke": ["edge::*"]},
                ]
            },
        )
        async with open_test_engine(edge_config) as edge:

            async def open_fn(data: Any, ctx: CallContext) -> Any:
                return "open"

            async def secret_fn(data: Any, ctx: CallContext) -> Any:
                return "secret"

            edge.register_function("edge::open", open_fn)
            edge.register_function("secret::fn", secret_fn)
            module = bridge_of(edge)
            assert await module.link.wait_connected(15)
            assert await edge.invoke("remote::echo", 7) == {"backend": 7}
            await wait_functions(backend, "edge::open", "secret::fn")
            assert await backend.invoke("edge::open", {}) == "open"
            with pytest.raises(IIIError) as forbidden:
                await backend.invoke("secret::fn", {})
            assert forbidden.value.code == "forbidden"

            # A local caller's grant covers the remote function ids it names.
            caller = Grant.from_patterns("caller", invoke=["bridge.*", "backend::echo"])
            invoke = {"function_id": "backend::echo", "data": 8}
            assert await edge.invoke("bridge.invoke", invoke, grant=caller) == {"backend": 8}
            narrow = Grant.from_patterns("narrow", invoke=["bridge.*"])
            for function_id in ("bridge.invoke", "bridge.invoke_async"):
                with pytest.raises(IIIError) as refused:
                    await edge.invoke(function_id, invoke, grant=narrow)
                assert refused.value.code == "forbidden"


# -- hostile remotes, through the module's functions -------------------------------------


async def test_hostile_remote_garbage_silence_and_a_close_mid_call() -> None:
    async def misbehave(ws: WebSocketConnection, message: dict[str, Any]) -> None:
        await ws.send_message("\x1b[2J not json")
        await ws.send_message(b"\x00" * 64)
        data = message["data"]
        if data == "silent":
            return
        if data == "close":
            await ws.aclose(code=1011, reason="bye")
            return
        await ws.send_message(result_for(message, {"fine": data}))

    async with fake_remote(misbehave) as (port, connections, _):
        bridge = bridge_entry(
            f"ws://127.0.0.1:{port}",
            forward=[{"local_function": "remote::x", "remote_function": "x", "timeout_ms": 300}],
        )
        async with open_test_engine(engine_config([bridge])) as edge:
            module = bridge_of(edge)
            assert await module.link.wait_connected(15)
            assert await edge.invoke("remote::x", "ok") == {"fine": "ok"}
            with pytest.raises(IIIError) as silent:
                await edge.invoke("remote::x", "silent")
            assert silent.value.code == "timeout"
            with pytest.raises(IIIError) as closed:
                await edge.invoke(
                    "bridge.invoke", {"function_id": "x", "data": "close", "timeout_ms": 60_000}
                )
            assert closed.value.code == "invocation_stopped"
            assert await module.link.wait_connected(15)
            assert await edge.invoke("bridge.invoke", {"function_id": "x", "data": 1}) == {
                "fine": 1
            }
            assert len(connections) == 2


async def test_two_bridges_one_per_remote() -> None:
    async with AsyncExitStack() as stack:
        remotes = [
            await stack.enter_async_context(open_test_engine(engine_config([]))) for _ in range(2)
        ]
        for index, remote in enumerate(remotes):

            async def whoami(data: Any, ctx: CallContext, index: int = index) -> Any:
                return f"remote-{index}"

            remote.register_function("who::ami", whoami)
        bridges = [
            bridge_entry(url_of(remotes[0]), name="first"),
            bridge_entry(
                url_of(remotes[1]),
                name="second",
                forward=[{"local_function": "second::who", "remote_function": "who::ami"}],
            ),
        ]
        edge = await stack.enter_async_context(open_test_engine(engine_config(bridges)))
        for name in ("first", "second"):
            assert await bridge_of(edge, name).link.wait_connected(15)
        assert await edge.invoke("bridge.invoke", {"function_id": "who::ami"}) == "remote-0"
        assert (
            await edge.invoke("bridge.invoke", {"function_id": "who::ami", "bridge": "second"})
            == "remote-1"
        )
        assert await edge.invoke("second::who", {}) == "remote-1"
        with pytest.raises(IIIError) as unknown:
            await edge.invoke("bridge.invoke", {"function_id": "who::ami", "bridge": "third"})
        assert unknown.value.code == "bridge_not_found"


# -- engine processes ------------------------------------------------------------------------


async def call_until(
    worker: SdkWorker, fn: str, data: Any, want: str, attempts: int = 200
) -> tuple[str, Any]:
    """Call until the answer is ``want`` ("OK" or an error code); the last answer."""
    answer: tuple[str, Any] = ("", None)
    for _ in range(attempts):
        answer = await command(worker, op="call", fn=fn, data=data, timeout=40)
        status, value = answer
        if status == want or (status == "ERR" and value.get("code") == want):
            return answer
        await trio.sleep(0.1)
    return answer


async def test_engine_processes_backend_killed_and_restarted(tmp_path: Path) -> None:
    """Both engines as ``python -m iii serve`` processes; the backend is SIGKILLed and started
    again: its SDK worker and the edge's link both come back by themselves."""
    (tmp_path / "backend").mkdir()
    (tmp_path / "edge").mkdir()
    backend = EngineProcess.write(tmp_path / "backend", {"modules": []})
    bridge = bridge_entry(
        backend.url,
        expose=[{"local_function": "edge::echo041"}],
        forward=[{"local_function": "remote::echo", "remote_function": "backend::echo025"}],
    )
    edge = EngineProcess.write(tmp_path / "edge", {"modules": [bridge]})
    backend.start()
    edge.start()
    try:
        await backend.started()
        await edge.started()
        async with start_sdk_worker(
            "0.25.0", SCRIPTS["0.25.0"], url=backend.url, args=("b025",)
        ) as b025, start_sdk_worker(
            "0.4.1", SCRIPTS["0.4.1"], url=edge.url, args=("e041",)
        ) as e041:  # fmt: skip
            await b025.wait_for("READY", timeout=60)
            await e041.wait_for("READY", timeout=60)
            assert await command(b025, op="register", id="backend::echo025") == ("OK", None)
            assert await command(e041, op="register", id="edge::echo041") == ("OK", None)
            status, value = await call_until(e041, "remote::echo", {"n": 1}, "OK")
            assert (status, value["by"], value["echo"]["n"]) == ("OK", "0.25.0", 1), value
            status, value = await call_until(b025, "edge::echo041", {"n": 2}, "OK")
            assert (status, value["by"], value["echo"]["n"]) == ("OK", "0.4.1", 2), value

            backend.kill()
            status, error = await call_until(e041, "remote::echo", {}, "bridge_unavailable")
            assert (status, error["code"]) == ("ERR", "bridge_unavailable"), error

            backend.start()
            await backend.started()
            status, value = await call_until(e041, "remote::echo", {"n": 3}, "OK")
            assert (status, value["echo"]["n"]) == ("OK", 3), value
            status, value = await call_until(b025, "edge::echo041", {"n": 4}, "OK")
            assert (status, value["echo"]["n"]) == ("OK", 4), value
    finally:
        backend.kill()
        edge.kill()
    assert "bridge client" in edge.log_text()
