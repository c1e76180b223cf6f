"""HTTP-invoked functions: the engine calls a URL itself.

A local HTTP server (the REST module's h11 server on loopback, with a test
app) plays the remote function and checks what arrives: method, headers, body
and every auth kind, verified on the server side.  Address blocking is off
for those happy paths (the server is on loopback) and on for the refusals.
"""

from __future__ import annotations

import base64
import ipaddress
import uuid
from contextlib import asynccontextmanager
from functools import partial

import orjson
import pytest
import trio

from iii.modules.http_functions import blocked_address_reason, sign_body
from iii.modules.rest_api.server import HttpRequest, HttpServer, Responder
from iii.testing import connect_test_worker, make_config, open_test_engine


class RemoteFunction:
    """The test server's app: records each request, answers by path."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.gate = trio.Event()

    async def __call__(self, request: HttpRequest, responder: Responder) -> None:
        body = await request.read_all(1 << 20)
        headers = {k.decode(): v.decode() for k, v in request.headers}
        self.requests.append(
            {"method": request.method, "path": request.path, "headers": headers, "body": body}
        )
        json = [(b"content-type", b"application/json")]
        if request.path == "/ok":
            await responder.respond(
                200, json, orjson.dumps({"echo": orjson.loads(body) if body else None})
            )
        elif request.path == "/empty":
            await responder.respond(200, [])
        elif request.path == "/notjson":
            await responder.respond(200, [], b"hello")
        elif request.path == "/err":
            await responder.respond(
                500, json, b'{"error": {"code": "boom", "message": "bad thing"}}'
            )
        elif request.path == "/redirect":
            await responder.respond(302, [(b"location", b"/ok")])
        elif request.path == "/slow":
            await trio.sleep(10)
            await responder.respond(200, json, b"{}")
        elif request.path == "/gate":
            await self.gate.wait()
            await responder.respond(200, json, b'{"through": true}')
        else:
            await responder.respond(404, [], b"nope")

    def last(self) -> dict:
        return self.requests[-1]


@asynccontextmanager
async def remote_server():
    app = RemoteFunction()
    server = HttpServer(app)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", 0)
        app.port = server.port
        try:
            yield app
        finally:
            nursery.cancel_scope.cancel()


def http_functions(**config):
    security = config.pop("security", {"require_https": False, "block_private_ips": False})
    return {
        "class": "modules::http_functions::HttpFunctionsModule",
        "config": {"security": security, "secret_env_allowlist": ["III_TEST_*"], **config},
    }


@asynccontextmanager
async def engine_with(**config):
    async with open_test_engine(make_config([http_functions(**config)])) as engine:
        async with connect_test_worker(engine) as owner, connect_test_worker(engine) as caller:
            yield engine, owner, caller


async def register(engine, owner, function_id, invocation, *, expect_ok=True):
    await owner.send({"type": "registerfunction", "id": function_id, "invocation": invocation})
    if not expect_ok:
        return await owner.receive_type("registrationrejected")
    with trio.fail_after(5):
        while function_id not in engine.registry.functions:
            await trio.sleep(0.01)
    return None


async def test_call_reaches_the_url_with_method_headers_and_body():
    async with remote_server() as remote, engine_with() as (engine, owner, caller):
        url = f"http://localhost:{remote.port}/ok"
        await register(
            engine,
            owner,
            "ext::put",
            {"url": url, "method": "PUT", "timeout_ms": 5000, "headers": {"X-Custom": "yes"}},
        )
        result = await caller.call("ext::put", {"a": 1, "nested": {"b": [1, 2]}})
        assert "error" not in result, result
        echoed = result["result"]["echo"]
        assert echoed["a"] == 1 and echoed["nested"] == {"b": [1, 2]}
        assert echoed["_caller_worker_id"] == caller.worker_id
        seen = remote.last()
        assert seen["method"] == "PUT"
        assert seen["headers"]["content-type"] == "application/json"
        assert seen["headers"]["x-iii-function-path"] == "ext::put"
        assert uuid.UUID(seen["headers"]["x-iii-invocation-id"])
        assert seen["headers"]["x-iii-timestamp"].isdigit()
        assert seen["headers"]["x-custom"] == "yes"
        assert (
            seen["headers"]["host"] == f"localhost:{remote.port}"
        )  # the name, though the address was pinned
        assert orjson.loads(seen["body"]) == echoed

        # GET still sends the JSON body; the function belongs to its worker
        await register(engine, owner, "ext::get", {"url": url, "method": "GET"})
        assert (await caller.call("ext::get", {"q": 1}))["result"]["echo"]["q"] == 1
        assert remote.last()["method"] == "GET"


async def test_answers_and_errors():
    async with remote_server() as remote, engine_with() as (engine, owner, caller):
        base = f"http://127.0.0.1:{remote.port}"
        for name in ("empty", "notjson", "err", "missing", "redirect", "slow"):
            await register(
                engine, owner, f"ext::{name}", {"url": f"{base}/{name}", "timeout_ms": 500}
            )
        assert "result" not in await caller.call("ext::empty", {})  # null
        assert (await caller.call("ext::notjson", {}))["error"]["code"] == "invalid_response"
        assert (await caller.call("ext::err", {}))["error"] == {
            "code": "boom",
            "message": "bad thing",
        }
        assert (await caller.call("ext::missing", {}))["error"] == {
            "code": "http_error",
            "message": "HTTP 404",
        }
        hits = len(remote.requests)
        assert (await caller.call("ext::redirect", {}))["error"]["message"] == "HTTP 302"
        assert len(remote.requests) == hits + 1  # the redirect was not followed
        error = (await caller.call("ext::slow", {}))["error"]
        assert error["code"] == "http_request_failed"
        assert "timeout" in error["message"].lower() or "timed out" in error["message"]


async def test_each_auth_kind_is_verified_by_the_server(monkeypatch):
    monkeypatch.setenv("III_TEST_TOKEN", "tok-123")
    monkeypatch.setenv("III_TEST_USER", "alice")
    monkeypatch.setenv("III_TEST_PASS", "s3cret:pw")
    monkeypatch.setenv("III_TEST_KEY", "key-456")
    monkeypatch.setenv("III_TEST_HMAC", "hmac-secret")
    async with remote_server() as remote, engine_with() as (engine, owner, caller):
        url = f"http://127.0.0.1:{remote.port}/ok"
        auths = {
            "bearer": {"type": "bearer", "token_key": "III_TEST_TOKEN"},
            "basic": {
                "type": "basic",
                "username_key": "III_TEST_USER",
                "password_key": "III_TEST_PASS",
            },
            "api_key": {"type": "api_key", "header": "X-Api-Key", "value_key": "III_TEST_KEY"},
            "hmac": {"type": "hmac", "secret_key": "III_TEST_HMAC"},
        }
        for kind, auth in auths.items():
            await register(engine, owner, f"ext::{kind}", {"url": url, "auth": auth})
            result = await caller.call(f"ext::{kind}", {"kind": kind})
            assert result["result"]["echo"]["kind"] == kind
            headers = remote.last()["headers"]
            if kind == "bearer":
                assert headers["authorization"] == "Bearer tok-123"
            elif kind == "basic":
                scheme, _, encoded = headers["authorization"].partition(" ")
                assert scheme == "Basic"
                assert base64.b64decode(encoded).decode() == "alice:s3cret:pw"
            elif kind == "api_key":
                assert headers["x-api-key"] == "key-456"
                assert "authorization" not in headers
            else:
                body = remote.last()["body"]
                timestamp = int(headers["x-iii-timestamp"])
                assert headers["x-iii-signature"] == sign_body(body, "hmac-secret", timestamp)
                # a server recomputing it from what it received gets the same signature
                import hashlib
                import hmac as hmac_lib

                payload = f"{timestamp}:{base64.b64encode(body).decode()}".encode()
                digest = hmac_lib.new(b"hmac-secret", payload, hashlib.sha256).hexdigest()
                assert headers["x-iii-signature"] == f"sha256={digest}"


async def test_secrets_only_from_allowed_variables(monkeypatch):
    monkeypatch.setenv("III_TEST_TOKEN", "tok")
    monkeypatch.setenv("HOME_SECRET", "do-not-send")
    async with engine_with() as (engine, owner, caller):
        url = "http://127.0.0.1:9/ok"
        rejected = await register(
            engine,
            owner,
            "ext::steal",
            {"url": url, "auth": {"type": "bearer", "token_key": "HOME_SECRET"}},
            expect_ok=False,
        )
        assert rejected["code"] == "secret_not_allowed" and rejected["function_id"] == "ext::steal"
        rejected = await register(
            engine,
            owner,
            "ext::missing",
            {
                "url": url,
                "auth": {"type": "api_key", "header": "X-K", "value_key": "III_TEST_UNSET"},
            },
            expect_ok=False,
        )
        assert rejected["code"] == "api_key_not_found"
        rejected = await register(
            engine, owner, "ext::weird", {"url": url, "auth": {"type": "custom"}}, expect_ok=False
        )
        assert rejected["code"] == "invalid_invocation"
        assert "ext::steal" not in engine.registry.functions


async def test_url_rules_at_registration(caplog):
    # The worker gets the code (registrationrejected has no message); the
    # engine log names the rule.
    async with engine_with(security={"url_allowlist": ["*.example.com"]}) as (
        engine,
        owner,
        caller,
    ):
        cases = {
            "http://api.example.com/f": "HTTPS is required",
            "https://evil.test/f": "host evil.test is not in the url_allowlist",
            "ftp://api.example.com/f": "invalid URL",
            "https://user:pw@api.example.com/f": "must not carry credentials",
        }
        for index, (url, rule) in enumerate(cases.items()):
            caplog.clear()
            rejected = await register(
                engine, owner, f"ext::r{index}", {"url": url}, expect_ok=False
            )
            assert rejected["code"] == "url_validation_failed", (url, rejected)
            assert rule in caplog.text
        assert not any(f.startswith("ext::") for f in engine.registry.functions)
    async with engine_with(security={"require_https": False}) as (engine, owner, caller):
        cases = {
            "169.254.169.254": "cloud metadata address",
            "127.0.0.1": "loopback address",
            "[::ffff:127.0.0.1]": "IPv4-mapped IPv6 address",
            "10.1.2.3": "private",
            "[::1]": "loopback address",
            "100.64.1.1": "CGNAT",
        }
        for index, (host, rule) in enumerate(cases.items()):
            caplog.clear()
            # One worker per case: a connection's refusals are rate-limited in
            # the log (the first five, then one per 10 s).
            async with connect_test_worker(engine) as registrant:
                rejected = await register(
                    engine,
                    registrant,
                    f"ext::ip{index}",
                    {"url": f"http://{host}/f"},
                    expect_ok=False,
                )
            assert rejected["code"] == "url_validation_failed"
            assert rule in caplog.text and "block_private_ips" in caplog.text


async def test_blocked_address_is_refused_on_call():
    async with (
        remote_server() as remote,
        engine_with(security={"require_https": False}) as (engine, owner, caller),
    ):
        # A host name passes registration; its address is checked on the call.
        await register(engine, owner, "ext::local", {"url": f"http://localhost:{remote.port}/ok"})
        result = await caller.call("ext::local", {})
        assert result["error"]["code"] == "invocation_failed"
        assert "loopback address" in result["error"]["message"]
        assert "block_private_ips" in result["error"]["message"]
        assert remote.requests == []  # nothing was sent


async def test_function_goes_with_its_worker():
    async with remote_server() as remote, engine_with() as (engine, owner, caller):
        await register(engine, owner, "ext::owned", {"url": f"http://127.0.0.1:{remote.port}/ok"})
        await owner.aclose()
        with trio.fail_after(5):
            while "ext::owned" in engine.registry.functions:
                await trio.sleep(0.01)
        assert (await caller.call("ext::owned", {}))["error"]["code"] == "function_not_found"


async def test_disabled_module_refuses_http_functions():
    async with open_test_engine(make_config([])) as engine, connect_test_worker(engine) as owner:
        await owner.send(
            {
                "type": "registerfunction",
                "id": "ext::x",
                "invocation": {"url": "https://a.example/"},
            }
        )
        assert (await owner.receive_type("registrationrejected"))[
            "code"
        ] == "HTTP_FUNCTIONS_DISABLED"


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("64:ff9b::7f00:1", "NAT64"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("2002:7f00:1::", "6to4/Teredo address wrapping a loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("192.0.2.1", "special-purpose"),
        ("255.255.255.255", "special-purpose"),
    ],
)
def test_address_rules(address, rule):
    reason = blocked_address_reason(ipaddress.ip_address(address))
    if rule is None:
        assert reason is None
    else:
        assert reason is not None and rule in reason, reason


async def test_unreachable_port_is_http_request_failed():
    async with engine_with() as (engine, owner, caller):
        from tests.support import reserve_port

        await register(
            engine, owner, "ext::closed", {"url": f"http://127.0.0.1:{reserve_port()}/ok"}
        )
        error = (await caller.call("ext::closed", {}))["error"]
        assert error["code"] == "http_request_failed" and "cannot connect" in error["message"]


# -- one write: the head and a small body ----------------------------------------------


@asynccontextmanager
async def head_reader(ssl_context=None):
    """A receiver like the official SDK suites' webhook probe: it reads until the
    end of the head and takes what came with it as the body (no Content-Length,
    no second read), answers ``{"ok": true}`` and closes.  ``bodies`` records
    what each request's reads brought after the head."""
    bodies: list[bytes] = []

    async def handle(stream: trio.abc.Stream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    data += chunk
            bodies.append(data.partition(b"\r\n\r\n")[2])
            answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"ok":true}'
            await stream.send_all(answer)

    if ssl_context is None:
        serve = partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
    else:
        serve = partial(trio.serve_ssl_over_tcp, handle, 0, ssl_context, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve)
        try:
            tcp = listeners[0].transport_listener if ssl_context else listeners[0]
            yield tcp.socket.getsockname()[1], bodies
        finally:
            nursery.cancel_scope.cancel()


async def test_the_head_and_a_small_body_go_in_one_write():
    """Before: httpcore wrote the head, then the body; a receiver that woke up
    between the two writes saw the head alone (about every other call here)."""
    async with head_reader() as (port, bodies), engine_with() as (engine, owner, caller):
        await register(engine, owner, "ext::probe", {"url": f"http://127.0.0.1:{port}/webhook"})
        for n in range(20):
            payload = {"n": n, "text": "x" * (n * 50)}
            reply = await caller.call("ext::probe", payload)
            sent = {**payload, "_caller_worker_id": caller.worker_id}
            assert bodies[-1] == orjson.dumps(sent), (n, bodies[-1][:100])
            # (Closing with the body unread, the receiver reset the connection.)
            assert reply.get("result") == {"ok": True}, reply


async def test_one_write_over_https_too(monkeypatch):
    """Coalesced above TLS: the stream start_tls returns is wrapped as well."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)

    def trusting() -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    monkeypatch.setattr("iii.modules._http_transport.client_ssl_context", trusting)
    security = {"require_https": True, "block_private_ips": False}
    async with (
        head_reader(server_context) as (port, bodies),
        engine_with(security=security) as (
            engine,
            owner,
            caller,
        ),
    ):
        await register(engine, owner, "ext::tls", {"url": f"https://localhost:{port}/webhook"})
        for n in range(10):
            reply = await caller.call("ext::tls", {"n": n})
            assert orjson.loads(bodies[-1])["n"] == n, (n, bodies[-1][:100])
            assert reply.get("result") == {"ok": True}, reply


async def test_a_large_body_arrives_whole():
    """Past the coalescing bound the body is written after the head, in full."""
    async with remote_server() as remote, engine_with() as (engine, owner, caller):
        await register(engine, owner, "ext::big", {"url": f"http://127.0.0.1:{remote.port}/ok"})
        blob = "y" * (512 * 1024)
        reply = await caller.call("ext::big", {"blob": blob}, timeout=20)
        assert reply["result"]["echo"]["blob"] == blob
        assert len(remote.last()["body"]) > 512 * 1024


# -- with the official SDKs -------------------------------------------------------------

SDK_WORKERS = {
    "0.4.1": """
import asyncio, json, sys
from iii import III, InitOptions
from iii.iii_types import HttpInvocationConfig, HttpAuthBearer

async def main():
    iii = III(sys.argv[1], InitOptions(worker_name="hf041"))
    iii.register_http_function("sdk::remote", HttpInvocationConfig(
        url=sys.argv[2], method="PUT", headers={"x-from": "sdk"}, auth=HttpAuthBearer(token_key="III_TEST_TOKEN")))
    await iii.connect()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    print("OK " + json.dumps(await iii.trigger("sdk::remote", {"v": 1})), flush=True)

asyncio.run(main())
""",
    "0.25.0": """
import json, sys
from iii import register_worker, InitOptions
from iii_helpers.http import HttpInvocationConfig, HttpAuthBearer

iii = register_worker(sys.argv[1], InitOptions(worker_name="hf025", otel={"enabled": False}))
iii.register_function("sdk::remote", HttpInvocationConfig(
    url=sys.argv[2], method="PUT", headers={"x-from": "sdk"}, auth=HttpAuthBearer(token_key="III_TEST_TOKEN")))
print("READY", flush=True)
sys.stdin.readline()
print("OK " + json.dumps(iii.trigger({"function_id": "sdk::remote", "payload": {"v": 1}})), flush=True)
iii.shutdown()
""",
}


@pytest.mark.sdk
@pytest.mark.parametrize("version", list(SDK_WORKERS))
async def test_sdk_registers_and_calls_an_http_function(version, monkeypatch):
    from tests.support import start_sdk_worker

    monkeypatch.setenv("III_TEST_TOKEN", f"sdk-token-{version}")
    async with (
        remote_server() as remote,
        open_test_engine(make_config([http_functions()])) as engine,
    ):
        url = f"http://127.0.0.1:{remote.port}/ok"
        async with start_sdk_worker(
            version, SDK_WORKERS[version], url=f"ws://127.0.0.1:{engine.listen_port}", args=(url,)
        ) as worker:
            await worker.wait_for("READY", timeout=60)
            with trio.fail_after(20):
                while "sdk::remote" not in engine.registry.functions:
                    await trio.sleep(0.05)
            await worker.send_line("go")
            line = await worker.wait_for("OK ", timeout=30)
        assert orjson.loads(line[3:])["echo"]["v"] == 1
        seen = remote.last()
        assert seen["method"] == "PUT"
        assert seen["headers"]["x-from"] == "sdk"
        assert seen["headers"]["authorization"] == f"Bearer sdk-token-{version}"
        assert seen["headers"]["x-iii-function-path"] == "sdk::remote"


@pytest.mark.sdk
@pytest.mark.parametrize("version", list(SDK_WORKERS))
async def test_sdk_http_function_body_reaches_a_head_reader(version, monkeypatch):
    """The official suites' case: the SDK registers an HTTP function whose URL is
    a receiver that reads once after the head; the body must be there."""
    from tests.support import start_sdk_worker

    monkeypatch.setenv("III_TEST_TOKEN", f"sdk-token-{version}")
    config = make_config([http_functions()])
    async with head_reader() as (port, bodies), open_test_engine(config) as engine:
        url = f"http://127.0.0.1:{port}/webhook"
        async with start_sdk_worker(
            version, SDK_WORKERS[version], url=f"ws://127.0.0.1:{engine.listen_port}", args=(url,)
        ) as worker:
            await worker.wait_for("READY", timeout=60)
            with trio.fail_after(20):
                while "sdk::remote" not in engine.registry.functions:
                    await trio.sleep(0.05)
            await worker.send_line("go")
            line = await worker.wait_for("OK ", timeout=30)
        assert orjson.loads(bodies[-1])["v"] == 1, bodies
        assert orjson.loads(line[3:]) == {"ok": True}


async def test_a_client_dropped_from_the_pool_finishes_its_calls_first(monkeypatch):
    """With more hosts than pooled clients, the least recently used client
    leaves the pool; a call still running on it must not lose its connection."""
    monkeypatch.setattr("iii.modules.http_functions.MAX_CLIENTS", 1)
    async with remote_server() as remote, engine_with() as (engine, owner, caller):
        await register(engine, owner, "ext::gate", {"url": f"http://localhost:{remote.port}/gate"})
        await register(engine, owner, "ext::other", {"url": f"http://127.0.0.1:{remote.port}/ok"})
        module = engine.modules["http_functions"]
        async with connect_test_worker(engine) as gate_caller, trio.open_nursery() as nursery:
            answers = {}

            async def call_gate():
                answers["gate"] = await gate_caller.call("ext::gate", {}, timeout=10)

            nursery.start_soon(call_gate)
            with trio.fail_after(5):
                while not any(r["path"] == "/gate" for r in remote.requests):
                    await trio.sleep(0.01)
            # A call to another host takes the only pool slot from the gated call's client.
            assert (await caller.call("ext::other", {"n": 1}))["result"]["echo"] == {
                "n": 1,
                "_caller_worker_id": caller.worker_id,
            }
            assert len(module.clients) == 1
            remote.gate.set()
        assert answers["gate"].get("result") == {"through": True}, answers["gate"]
        assert not module._in_use and not module._dropped
