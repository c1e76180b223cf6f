"""Security on the worker port: bearer-token auth and grants, TLS, limits.

Raw protocol clients over loopback sockets (the checks happen before the
upgrade, so the memory-stream helper would skip them), plus the official 0.25
SDK, which sends ``Authorization: Bearer $III_TOKEN`` and speaks ``wss://``.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import orjson
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, open_websocket, wrap_client_stream

from iii.config import parse_config
from iii.errors import ConfigError
from iii.testing import RawWorker, make_config, open_test_engine
from tests.support import start_sdk_worker

TOKEN_ADMIN = "admin-token-0123456789abcdef"
TOKEN_LIMITED = "limited-token-0123456789abcdef"

AUTH = {
    "tokens": [
        {"name": "admin", "env": "III_TEST_TOKEN_ADMIN"},
        {
            "name": "limited",
            "env": "III_TEST_TOKEN_LIMITED",
            "register": ["mine::*"],
            "invoke": ["mine::*", "shared::*"],
            "trigger_types": ["hook"],
        },
    ]
}


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_TEST_TOKEN_ADMIN", TOKEN_ADMIN)
    monkeypatch.setenv("III_TEST_TOKEN_LIMITED", TOKEN_LIMITED)


@asynccontextmanager
async def raw_worker(
    port: int,
    token: str | None = None,
    *,
    path: str = "/",
    ssl_context: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[RawWorker]:
    """A raw worker over a socket this helper owns and always closes.

    (trio-websocket's client leaves its socket open when the server closes
    first, e.g. with 1009.)
    """
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    stream: trio.abc.Stream
    if ssl_context is not None:
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, host, path, extra_headers=headers)
        worker = RawWorker(ws)
        if path == "/":
            registered = await worker.receive()
            assert registered["type"] == "workerregistered"
            worker.worker_id = registered["worker_id"]
        try:
            yield worker
        finally:
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def upgrade_status(port: int, path: str = "/", token: str | None = None) -> tuple[int, bytes]:
    """Send a WebSocket upgrade by hand and return the HTTP status and body.

    (trio-websocket's client leaks its socket when the upgrade is refused.)
    """
    connection = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            connection.send(h11.Request(method="GET", target=path, headers=headers))
        )
        status, body = 0, b""
        with trio.fail_after(5):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data and status == 0:
                        return 0, b""  # closed without an HTTP answer
                    connection.receive_data(data)
                elif isinstance(event, (h11.Response, h11.InformationalResponse)):
                    status = event.status_code
                    if status == 101:
                        return status, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, body


async def wait_log(
    caplog: pytest.LogCaptureFixture, text: str, timeout: float = 10
) -> logging.LogRecord:
    with trio.fail_after(timeout):
        while True:
            for record in caplog.records:
                if text in record.getMessage():
                    return record
            await trio.sleep(0.05)


# -- config -------------------------------------------------------------------------


def test_token_secret_comes_from_the_environment() -> None:
    config = parse_config(
        {"auth": AUTH},
        env={"III_TEST_TOKEN_ADMIN": TOKEN_ADMIN, "III_TEST_TOKEN_LIMITED": TOKEN_LIMITED},
    )
    assert [t.secret for t in config.auth.tokens] == [TOKEN_ADMIN, TOKEN_LIMITED]
    assert TOKEN_ADMIN not in repr(config)
    with pytest.raises(ConfigError, match="III_TEST_TOKEN_LIMITED .* not set") as info:
        parse_config({"auth": AUTH}, env={"III_TEST_TOKEN_ADMIN": TOKEN_ADMIN})
    assert info.value.key == "auth.tokens[1].env"
    with pytest.raises(ConfigError, match="at least 16"):
        parse_config(
            {"auth": AUTH},
            env={"III_TEST_TOKEN_ADMIN": "short", "III_TEST_TOKEN_LIMITED": TOKEN_LIMITED},
        )
    with pytest.raises(ConfigError, match="unknown key: secret"):
        parse_config(
            {"auth": {"tokens": [{"env": "X", "secret": TOKEN_ADMIN}]}}, env={"X": TOKEN_ADMIN}
        )
    with pytest.raises(ConfigError, match="list of strings"):
        parse_config(
            {"auth": {"tokens": [{"env": "X", "invoke": "mine::*"}]}}, env={"X": TOKEN_ADMIN}
        )


def test_tls_needs_both_files(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="together"):
        parse_config({"tls": {"cert": str(tmp_path / "c.pem")}})
    with pytest.raises(ConfigError, match="file not found") as info:
        parse_config({"tls": {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}})
    assert info.value.key == "tls.cert"


# -- authentication -----------------------------------------------------------------


async def test_upgrade_without_valid_token_is_refused_and_logged(
    tokens: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="iii.listener")
    async with open_test_engine(make_config(auth=AUTH)) as engine:
        port = engine.listen_port
        assert port is not None
        for token, reason in (
            (None, "no Authorization header"),
            ("wrong-token-0123456789", "unknown bearer token"),
        ):
            for path in ("/", "/otel"):
                status, body = await upgrade_status(port, path, token)
                assert (status, body) == (401, b"Unauthorized")
                record = await wait_log(caplog, f"refused {path} upgrade from 127.0.0.1")
                assert reason in record.getMessage()
                caplog.clear()
        assert not any(TOKEN_ADMIN in r.getMessage() for r in caplog.records)
        # A valid token gets in, on both paths; the engine still serves.
        async with raw_worker(port, TOKEN_ADMIN) as worker:
            result = await worker.call("engine::functions::list", {})
            assert "result" in result
        async with raw_worker(port, TOKEN_LIMITED, path="/otel") as otel:
            await otel.ws.send_message(b"OTLP{}")
        # Channel sockets keep their own check (the channel's access key).
        channel = engine.channels.create(4)
        ref = channel.ref("write")
        async with open_websocket(
            "127.0.0.1",
            port,
            f"/ws/channels/{ref['channel_id']}?key={ref['access_key']}&dir=write",
            use_ssl=False,
        ) as ws:
            await ws.send_message(b"data")


async def test_grant_limits_what_a_worker_may_do(tokens: None) -> None:
    async with open_test_engine(make_config(auth=AUTH)) as engine:
        port = engine.listen_port
        assert port is not None
        async with (
            raw_worker(port, TOKEN_ADMIN) as admin,
            raw_worker(port, TOKEN_LIMITED) as limited,
        ):
            # The admin provides functions and a trigger type.
            for function_id in ("shared::echo", "secret::echo"):
                await admin.send({"type": "registerfunction", "id": function_id})
            await admin.send({"type": "registertriggertype", "id": "hook", "description": "hook"})
            await admin.send({"type": "registertriggertype", "id": "other", "description": "other"})
            await admin.call("engine::functions::list", {})  # registrations are applied in order

            # Registering outside the grant is refused, inside is fine.
            await limited.send({"type": "registerfunction", "id": "secret::mine"})
            rejected = await limited.receive_type("registrationrejected")
            assert rejected["code"] == "FORBIDDEN" and rejected["function_id"] == "secret::mine"
            await limited.send({"type": "registerfunction", "id": "mine::fn"})
            await limited.send({"type": "registertriggertype", "id": "sneaky", "description": "x"})
            await limited.call("engine::functions::list", {})
            assert "secret::mine" not in engine.registry.functions
            assert "mine::fn" in engine.registry.functions
            assert "sneaky" not in engine.registry.trigger_types

            # Invoking outside the grant is answered "forbidden".
            answer = await limited.call("secret::echo", {"x": 1})
            assert answer["error"]["code"] == "forbidden"
            answer = await limited.call("engine::functions::list", {})
            assert answer["error"]["code"] == "forbidden"

            async def serve_echo() -> None:
                message = await admin.receive_type("invokefunction")
                await admin.send(
                    {
                        "type": "invocationresult",
                        "invocation_id": message["invocation_id"],
                        "function_id": message["function_id"],
                        "result": {"got": message["data"]["x"]},
                    }
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_echo)
                answer = await limited.call("shared::echo", {"x": 2})
            assert answer["result"] == {"got": 2}

            # Triggers: the type must be allowed and the function invokable.
            cases = [
                ("other", "mine::fn", "trigger type other"),
                ("hook", "secret::echo", "secret::echo"),
            ]
            for trigger_type, function_id, reason in cases:
                trigger_id = str(uuid.uuid4())
                await limited.send(
                    {
                        "type": "registertrigger",
                        "id": trigger_id,
                        "trigger_type": trigger_type,
                        "function_id": function_id,
                        "config": {},
                    }
                )
                refused = await limited.receive_type("triggerregistrationresult")
                assert refused["id"] == trigger_id
                assert (
                    refused["error"]["code"] == "forbidden"
                    and reason in refused["error"]["message"]
                )
            trigger_id = str(uuid.uuid4())
            await limited.send(
                {
                    "type": "registertrigger",
                    "id": trigger_id,
                    "trigger_type": "hook",
                    "function_id": "mine::fn",
                    "config": {"a": 1},
                }
            )
            forwarded = await admin.receive_type("registertrigger")
            assert forwarded["id"] == trigger_id and forwarded["function_id"] == "mine::fn"


WORKER_025 = """
import sys
from iii import register_worker, InitOptions

iii = register_worker(sys.argv[1], InitOptions(worker_name="secure025", otel={"enabled": False}))
iii.register_function("secure::ping", lambda data: {"pong": data.get("n")}, description="ping")
print("READY", flush=True)
sys.stdin.readline()
iii.shutdown()
"""


async def wait_function(engine: Any, function_id: str, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while function_id not in engine.registry.functions:
            await trio.sleep(0.05)


@pytest.mark.sdk
async def test_sdk_025_authenticates_with_iii_token(
    tokens: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="iii.listener")
    async with open_test_engine(make_config(auth=AUTH)) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        async with start_sdk_worker(
            "0.25.0", WORKER_025, url=url, env={"III_TOKEN": "not-the-right-token-123"}
        ):
            await wait_log(caplog, "refused / upgrade from 127.0.0.1", timeout=30)
            assert "secure::ping" not in engine.registry.functions
        async with start_sdk_worker(
            "0.25.0", WORKER_025, url=url, env={"III_TOKEN": TOKEN_ADMIN}
        ) as worker:
            await worker.wait_for("READY", timeout=40)
            await wait_function(engine, "secure::ping")
            assert await engine.invoke("secure::ping", {"n": 7}) == {"pong": 7}


# -- TLS ----------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Any) -> tuple[trustme.CA, dict[str, str]]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return ca, {"cert": str(cert_path), "key": str(key_path), "ca": str(ca_path)}


async def test_wss_with_a_trustme_certificate(tls_files: tuple[trustme.CA, dict[str, str]]) -> None:
    ca, files = tls_files
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    # A short handshake timeout: a plain-text client on the TLS port is only
    # dropped when it runs out.
    config = make_config(tls={"cert": files["cert"], "key": files["key"]}, handshake_timeout_ms=500)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        async with raw_worker(port, ssl_context=client_context, host="localhost") as worker:
            answer = await worker.call("engine::functions::list", {})
            assert "result" in answer
        # A client that does not trust the CA fails the TLS handshake.
        tls_stream = await trio.open_ssl_over_tcp_stream(
            "localhost", port, ssl_context=ssl.create_default_context()
        )
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
            await tls_stream.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        await trio.aclose_forcefully(tls_stream)
        # Plain ws:// to the TLS port gets no HTTP answer, and is dropped.
        assert await upgrade_status(port) == (0, b"")
        # The engine keeps serving after both failures.
        async with raw_worker(port, ssl_context=client_context, host="localhost") as worker:
            assert "result" in await worker.call("engine::functions::list", {})


@pytest.mark.sdk
async def test_sdk_025_over_wss(tls_files: tuple[trustme.CA, dict[str, str]]) -> None:
    _, files = tls_files
    config = make_config(tls={"cert": files["cert"], "key": files["key"]})
    async with open_test_engine(config) as engine:
        url = f"wss://localhost:{engine.listen_port}"
        async with start_sdk_worker(
            "0.25.0", WORKER_025, url=url, env={"SSL_CERT_FILE": files["ca"]}
        ) as worker:
            await worker.wait_for("READY", timeout=40)
            await wait_function(engine, "secure::ping")
            assert await engine.invoke("secure::ping", {"n": 3}) == {"pong": 3}


# -- limits -------------------------------------------------------------------------


async def test_message_over_max_size_closes_with_1009_and_engine_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iii.worker_conn")
    async with open_test_engine(make_config(max_message_size=4096)) as engine:
        port = engine.listen_port
        assert port is not None
        async with raw_worker(port) as big, raw_worker(port) as other:
            await big.send({"type": "invokefunction", "function_id": "x", "data": "a" * 5000})
            with trio.fail_after(5):
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await big.ws.get_message()
            assert info.value.reason.code == 1009
            record = await wait_log(caplog, f"worker {big.worker_id}")
            assert "1009" in record.getMessage() and "maximum message size" in record.getMessage()
            assert "result" in await other.call("engine::functions::list", {})


async def test_connections_past_max_connections_get_503() -> None:
    async with open_test_engine(make_config(max_connections=2)) as engine:
        port = engine.listen_port
        assert port is not None
        async with raw_worker(port), raw_worker(port, path="/otel"):
            assert await upgrade_status(port) == (503, b"Too many connections")
        # Both closed: there is room again.
        with trio.fail_after(5):
            while engine.open_sockets:
                await trio.sleep(0.02)
        async with raw_worker(port) as worker:
            assert "result" in await worker.call("engine::functions::list", {})


async def test_pending_invocations_per_worker_are_capped() -> None:
    async with open_test_engine(make_config(max_pending_invocations=2)) as engine:
        port = engine.listen_port
        assert port is not None
        release = trio.Event()

        async def slow(data: Any, ctx: Any) -> Any:
            await release.wait()
            return "done"

        engine.register_function("test::slow", slow)
        async with raw_worker(port) as caller:
            ids = [str(uuid.uuid4()) for _ in range(3)]
            for invocation_id in ids:
                await caller.send(
                    {
                        "type": "invokefunction",
                        "function_id": "test::slow",
                        "data": {},
                        "invocation_id": invocation_id,
                    }
                )
            refused = await caller.receive_type("invocationresult")
            assert refused["invocation_id"] == ids[2]
            assert refused["error"]["code"] == "too_many_pending_invocations"
            release.set()
            answers = {
                (await caller.receive_type("invocationresult"))["invocation_id"] for _ in range(2)
            }
            assert answers == set(ids[:2])
            # Under the limit again: calls go through.
            assert (await caller.call("test::slow", {}))["result"] == "done"


async def test_handshake_timeout_closes_a_silent_socket() -> None:
    async with open_test_engine(make_config(handshake_timeout_ms=200)) as engine:
        assert engine.listen_port is not None
        stream = await trio.open_tcp_stream("127.0.0.1", engine.listen_port)
        with trio.fail_after(5):
            while await stream.receive_some(1024):
                pass
        await stream.aclose()


def _module_behind_tls(
    tls_files: tuple[trustme.CA, dict[str, str]], module_class: str
) -> tuple[ssl.SSLContext, Any]:
    """A client context trusting the test CA, and a config running ``module_class``
    on an ephemeral loopback port with the engine's ``tls`` set."""
    ca, files = tls_files
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    config = make_config(
        modules=[{"class": module_class, "config": {"port": 0, "host": "127.0.0.1"}}],
        tls={"cert": files["cert"], "key": files["key"]},
    )
    return trusting, config


async def test_rest_port_speaks_https_with_the_same_certificate(
    tls_files: tuple[trustme.CA, dict[str, str]],
) -> None:
    import httpx

    trusting, config = _module_behind_tls(tls_files, "modules::api::RestApiModule")
    async with open_test_engine(config) as engine:
        rest_port = engine.modules["rest_api"].port
        async with httpx.AsyncClient(verify=trusting, timeout=10) as client:
            response = await client.get(f"https://localhost:{rest_port}/health")
            assert response.status_code == 404  # answered over TLS (no built-in route)
            assert response.json()["error"]["code"] == "NOT_FOUND"
        async with httpx.AsyncClient(timeout=10) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"https://localhost:{rest_port}/health")
        async with httpx.AsyncClient(verify=trusting, timeout=10) as client:  # still serving
            assert (await client.get(f"https://localhost:{rest_port}/health")).status_code == 404


async def test_stream_port_speaks_wss_with_the_same_certificate(
    tls_files: tuple[trustme.CA, dict[str, str]],
) -> None:
    from trio_websocket import open_websocket

    trusting, config = _module_behind_tls(tls_files, "modules::stream::StreamModule")
    async with open_test_engine(config) as engine:
        port = engine.modules["stream"].server.listen_port
        async with open_websocket("localhost", port, "/", use_ssl=trusting) as ws:
            join = {"subscriptionId": "s1", "streamName": "tls", "groupId": "g"}
            await ws.send_message(orjson.dumps({"type": "join", "data": join}).decode())
            with trio.fail_after(10):
                sync = orjson.loads(await ws.get_message())
            assert sync["event"]["type"] == "sync" and sync["streamName"] == "tls"
