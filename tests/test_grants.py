"""Grants (issue 10 rows 5, 6, 14) in an in-process engine over loopback sockets.

* Row 5: every function the engine calls for a worker is checked against the
  worker's token: trigger conditions at registration, the function an
  ``enqueue`` names, the calls a trigger or a job makes later (under the
  registrant's or enqueuer's grant); a trigger that re-fires itself is bounded.
* Row 6: data-bearing trigger types (state, stream, subscribe, queue, log,
  join/leave ...) are scoped: a token binds one only if it could read that
  data directly or a ``type(resource-pattern)`` entry covers it.
* Row 14: a stream ``auth_function`` that fails refuses the upgrade, and
  only a token that names it may register it (or a per-stream override).

The same attacks are replayed against a real engine process in
``tests/test_hostile_grants.py``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from iii.causation import MAX_TRIGGER_DEPTH
from iii.config import parse_config
from iii.errors import ConfigError
from iii.testing import RawWorker, make_config, open_test_engine
from tests.test_security import raw_worker, wait_log

TOKENS = {
    "III_T_ADMIN": "admin-token-000000000000",
    "III_T_SPY": "spy-token-00000000000000",
    "III_T_BILLING": "billing-token-0000000000",
    "III_T_PROVIDER": "provider-token-000000000",
}
ADMIN, SPY, BILLING, PROVIDER = TOKENS.values()

AUTH = {
    "tokens": [
        {"name": "admin", "env": "III_T_ADMIN"},
        # The attacker of issue 10: may only call its own functions.
        {"name": "spy", "env": "III_T_SPY", "register": ["spy::*"], "invoke": ["spy::*"]},
        {
            "name": "billing",
            "env": "III_T_BILLING",
            "register": ["billing::*"],
            "invoke": ["billing::*", "engine::queue::enqueue"],
            # A bare type lets it bind the type; type(pattern) scopes the data.
            "trigger_types": [
                "http",
                "cron",
                "state",
                "state(billing*)",
                "subscribe",
                "subscribe(orders.*)",
                "queue",
                "queue(billing.*)",
                "stream",
                "stream(billing*)",
                "log",
                "log(error)",
            ],
        },
        # May provide the stream auth function and overrides: it names them.
        {
            "name": "provider",
            "env": "III_T_PROVIDER",
            "register": ["*", "auth::stream", "stream::*(*)"],
        },
    ]
}


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)


def module(name: str, **config: Any) -> dict[str, Any]:
    return {"class": name, "config": config}


STATE = module("modules::state::StateModule")
QUEUE = module("modules::queue::QueueModule")
PUBSUB = module("modules::pubsub::PubSubModule")
CRON = module("modules::cron::CronModule")
REST = module("modules::api::RestApiModule", port=0, host="127.0.0.1")
OTEL = module("modules::observability::OtelModule", enabled=False, prometheus_enabled=False)


def stream(**config: Any) -> dict[str, Any]:
    return module("modules::stream::StreamModule", port=0, host="127.0.0.1", **config)


Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]


async def serve(worker: RawWorker, handlers: dict[str, Handler]) -> None:
    """Answer the invocations ``worker`` receives, each in its own task (run in a nursery)."""

    async def answer(message: dict[str, Any]) -> None:
        handler = handlers[message["function_id"]]
        try:
            reply: dict[str, Any] = {"result": await handler(message["data"], message)}
        except Exception as exc:
            reply = {"error": {"code": "failed", "message": str(exc)}}
        if message.get("invocation_id"):
            await worker.send(
                {
                    "type": "invocationresult",
                    "invocation_id": message["invocation_id"],
                    "function_id": message["function_id"],
                    **reply,
                }
            )

    async with trio.open_nursery() as nursery:
        while True:
            message = await worker.receive_type("invokefunction", timeout=60)
            nursery.start_soon(answer, message)


async def bind(
    worker: RawWorker, trigger_type: str, function_id: str, config: Any
) -> dict[str, Any] | None:
    """Register a trigger; its refusal, or None once it was accepted."""
    trigger_id = str(uuid.uuid4())
    await worker.send(
        {
            "type": "registertrigger",
            "id": trigger_id,
            "trigger_type": trigger_type,
            "function_id": function_id,
            "config": config,
        }
    )
    # Registrations are applied in order and a refusal is queued at once, so
    # it arrives before the answer to a call sent after it.
    assert "result" in await worker.call("engine::workers::register", {})
    for index, message in enumerate(worker.backlog):
        if message.get("type") == "triggerregistrationresult" and message["id"] == trigger_id:
            del worker.backlog[index]
            error: dict[str, Any] = message["error"]
            return error
    return None


async def register(worker: RawWorker, function_id: str) -> str | None:
    """Register a function; the ``registrationrejected`` code, or None."""
    await worker.send({"type": "registerfunction", "id": function_id})
    assert "result" in await worker.call("engine::workers::register", {})
    for index, message in enumerate(worker.backlog):
        if message.get("type") == "registrationrejected" and message["function_id"] == function_id:
            del worker.backlog[index]
            code: str = message["code"]
            return code
    return None


# -- configuration -------------------------------------------------------------------


def test_trigger_type_entries_are_validated() -> None:
    env = {"X": ADMIN, "Y": SPY}

    def parse(trigger_types: Any, **token: Any) -> Any:
        return parse_config(
            {"auth": {"tokens": [{"env": "X", "trigger_types": trigger_types, **token}]}}, env=env
        )

    config = parse(["http", "state(billing*)", "stream:join(chat*)", "stream:*"])
    assert config.auth.tokens[0].trigger_types[1] == "state(billing*)"
    for entry, reason in [
        ("state(", "type(resource-pattern)"),
        ("state()", "resource pattern inside '()' is empty"),
        ("(x)", "trigger type before '(' is missing"),
        ("st*(x)", "must be a name, not a pattern"),
        ("", "an empty pattern"),
    ]:
        pattern = reason.replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ConfigError, match=pattern) as info:
            parse(["http", entry])
        assert info.value.key == "auth.tokens[0].trigger_types[1]"
    with pytest.raises(ConfigError, match="expected a list of strings"):
        parse([True])
    with pytest.raises(ConfigError, match="named 'same'") as info:
        parse_config(
            {"auth": {"tokens": [{"name": "same", "env": "X"}, {"name": "same", "env": "Y"}]}},
            env=env,
        )
    assert info.value.key == "auth.tokens[1].name"


# -- row 5: conditions and the functions named in payloads --------------------------------


async def test_conditions_outside_the_grant_are_refused_at_registration(tokens: None) -> None:
    config = make_config([STATE, QUEUE, CRON, REST, stream()], auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        async with raw_worker(port, ADMIN) as admin, raw_worker(port, SPY) as spy:
            assert await register(admin, "admin::secret") is None
            assert await register(spy, "spy::handler") is None
            # The spy may bind triggers: its grant has every trigger type.
            assert await bind(spy, "http", "spy::handler", {"api_path": "/spy/ok"}) is None
            cases = [
                ("http", {"api_path": "/spy", "condition_function_id": "admin::secret"}),
                ("http", {"api_path": "/spy2", "_condition_path": "admin::secret"}),
                ("cron", {"expression": "* * * * * *", "condition": "admin::secret"}),
                ("queue", {"topic": "spy", "_condition_path": "state::delete"}),
                ("state", {"scope": "spy", "condition_function_id": "state::delete"}),
                ("stream", {"stream_name": "spy", "condition_function_id": "admin::secret"}),
            ]
            for trigger_type, trigger_config in cases:
                refusal = await bind(spy, trigger_type, "spy::handler", trigger_config)
                assert refusal is not None, (trigger_type, trigger_config)
                assert refusal["code"] == "forbidden", refusal
                named = next(v for k, v in trigger_config.items() if "condition" in k)
                assert f"may not invoke {named!r}" in refusal["message"], refusal
            assert len(engine.modules["rest_api"].routes) == 1
            # Nothing of it runs: GET /spy is not a route.
            rest_port = engine.modules["rest_api"].port
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{rest_port}/spy")
            assert response.status_code == 404
            # The admin (every list "*") still may.
            config_ok = {"api_path": "/a", "_condition_path": "state::get"}
            assert await bind(admin, "http", "admin::secret", config_ok) is None


async def test_enqueue_names_a_function_the_grant_must_allow(tokens: None) -> None:
    config = make_config([QUEUE], auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        calls: list[str] = []

        async def record(data: Any, message: dict[str, Any]) -> Any:
            calls.append(message["function_id"])
            return None

        async with (
            raw_worker(port, ADMIN) as admin,
            raw_worker(port, BILLING) as billing,
            trio.open_nursery() as nursery,
        ):
            for function_id in ("admin::secret", "billing::job"):
                assert await register(admin, function_id) is None
            nursery.start_soon(serve, admin, {"admin::secret": record, "billing::job": record})
            answer = await billing.call(
                "engine::queue::enqueue",
                {"queue": "q", "function_id": "admin::secret", "data": {}},
            )
            assert answer["error"]["code"] == "forbidden", answer
            action = {"type": "enqueue", "queue": "q"}
            answer = await billing.call("admin::secret", {}, action=action)
            assert answer["error"]["code"] == "forbidden", answer
            # Its own function is fine, through both doors.
            answer = await billing.call("billing::job", {}, action=action)
            assert "result" in answer, answer
            answer = await billing.call(
                "engine::queue::enqueue", {"queue": "q", "function_id": "billing::job", "data": {}}
            )
            assert "result" in answer, answer
            with trio.fail_after(10):
                while len(calls) < 2:
                    await trio.sleep(0.02)
            assert calls == ["billing::job", "billing::job"]
            nursery.cancel_scope.cancel()


async def test_a_trigger_fires_under_its_registrants_grant(tokens: None) -> None:
    """A nested call made by an engine function a trigger runs is checked too:
    billing's queue trigger runs engine::queue::enqueue, whose job names
    admin::secret; the job is refused, never enqueued."""
    config = make_config([QUEUE], auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        calls: list[str] = []

        async def record(data: Any, message: dict[str, Any]) -> Any:
            calls.append(message["function_id"])
            return None

        async with (
            raw_worker(port, ADMIN) as host,
            raw_worker(port, ADMIN) as admin,
            raw_worker(port, BILLING) as billing,
            trio.open_nursery() as nursery,
        ):
            for function_id in ("admin::secret", "admin::marker"):
                assert await register(host, function_id) is None
            nursery.start_soon(serve, host, {"admin::secret": record, "admin::marker": record})
            refusal = await bind(
                billing, "queue", "engine::queue::enqueue", {"topic": "billing.relay"}
            )
            assert refusal is None
            for target in ("admin::secret", "admin::secret"):
                job = {"queue": "relay", "function_id": target, "data": {}}
                answer = await admin.call("enqueue", {"topic": "billing.relay", "data": job})
                assert "error" not in answer, answer
            # The admin's own job on the same queue runs: the queue works.
            answer = await admin.call(
                "engine::queue::enqueue",
                {"queue": "relay", "function_id": "admin::marker", "data": {}},
            )
            assert "result" in answer
            with trio.fail_after(10):
                while "admin::marker" not in calls:
                    await trio.sleep(0.02)
            queue = engine.modules["queue"]
            with trio.fail_after(30):
                while queue.statistics()["jobs_dead_lettered"] < 2:
                    await trio.sleep(0.05)
            assert calls == ["admin::marker"]
            nursery.cancel_scope.cancel()


# -- row 5: triggers that re-fire themselves ----------------------------------------------


async def loop_cut(caplog: pytest.LogCaptureFixture, timeout: float = 30) -> None:
    """Wait for the warning that a chain of trigger firings was cut."""
    await wait_log(caplog, "nested trigger firings", timeout=timeout)


async def test_a_state_trigger_that_refires_itself_is_bounded(
    tokens: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The second attack of row 5, under a token that may do it (the admin):
    a state trigger whose condition is state::delete deletes the key, which
    fires it again ... bounded at MAX_TRIGGER_DEPTH, then the engine is idle."""
    caplog.set_level(logging.WARNING, logger="iii")
    config = make_config([STATE], auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        handled: list[Any] = []
        deletes: list[Any] = []

        async def handler(data: Any, message: dict[str, Any]) -> Any:
            (deletes if message["function_id"] == "admin::deletes" else handled).append(data)
            return None

        async with (
            raw_worker(port, ADMIN) as host,
            raw_worker(port, ADMIN) as admin,
            trio.open_nursery() as nursery,
        ):
            for function_id in ("admin::watch", "admin::deletes"):
                assert await register(host, function_id) is None
            nursery.start_soon(serve, host, {"admin::watch": handler, "admin::deletes": handler})
            refusal = await bind(
                admin,
                "state",
                "admin::watch",
                {"scope": "loop", "condition_function_id": "state::delete"},
            )
            assert refusal is None
            # A second trigger on another scope counts nothing: the loop stays in "loop".
            assert await bind(admin, "state", "admin::deletes", {"scope": "other"}) is None
            written = await admin.call("state::set", {"scope": "loop", "key": "k", "value": 1})
            assert "result" in written
            await loop_cut(caplog)
            # The first delete returned the value (the handler ran once, maybe
            # after the cut: the deletes chain without a worker round trip);
            # the following ones found nothing (null skips the handler).
            with trio.fail_after(10):
                while not handled:
                    await trio.sleep(0.02)
            # The engine runs in this process and the worker is on loopback: once
            # every task waits, any further firing would have reached the handler.
            await trio.testing.wait_all_tasks_blocked()
            assert len(handled) == 1 and handled[0]["event_type"] == "state:created"
            dispatch = engine.modules["state"].dispatch
            assert dispatch.loops.skipped == 1  # one chain, cut once
            # Idle again, and still serving.
            written = await admin.call("state::set", {"scope": "other", "key": "x", "value": 2})
            assert "result" in written
            with trio.fail_after(10):
                while not deletes:
                    await trio.sleep(0.02)
            assert dispatch.loops.skipped == 1
            nursery.cancel_scope.cancel()


TRACING = module(
    "modules::observability::OtelModule", enabled=True, exporter="memory", prometheus_enabled=False
)


@pytest.mark.parametrize(
    "modules",
    [[STATE], [STATE, OTEL], [STATE, TRACING]],
    ids=["no-tracer", "traces-off", "tracing"],
)
async def test_a_chain_through_a_worker_is_bounded_by_its_trace(
    tokens: None, caplog: pytest.LogCaptureFixture, modules: list[dict[str, Any]]
) -> None:
    """The handler writes the state it watches, over its own connection, with
    the trace context of the invocation (as an SDK propagates it); without a
    tracer, with one that records no spans, and with one that does."""
    caplog.set_level(logging.WARNING, logger="iii")
    config = make_config(modules, auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        runs = 0

        async with (
            raw_worker(port, ADMIN) as host,
            raw_worker(port, ADMIN) as admin,
            trio.open_nursery() as nursery,
        ):

            async def handler(data: Any, message: dict[str, Any]) -> Any:
                nonlocal runs
                runs += 1
                await host.send(
                    {
                        "type": "invokefunction",
                        "function_id": "state::set",
                        "data": {"scope": "echo", "key": "k", "value": runs},
                        "traceparent": message.get("traceparent"),
                    }
                )
                return None

            assert await register(host, "admin::echo") is None
            nursery.start_soon(serve, host, {"admin::echo": handler})
            assert await bind(admin, "state", "admin::echo", {"scope": "echo"}) is None
            assert "result" in await admin.call(
                "state::set", {"scope": "echo", "key": "k", "value": 0}
            )
            await loop_cut(caplog)
            await trio.testing.wait_all_tasks_blocked()  # as above: nothing left in flight
            assert runs == MAX_TRIGGER_DEPTH
            assert engine.modules["state"].dispatch.loops.skipped == 1
            nursery.cancel_scope.cancel()


# -- row 6: data-bearing trigger types --------------------------------------------------


async def test_data_bearing_triggers_need_a_read_grant_or_a_scoped_entry(tokens: None) -> None:
    config = make_config([STATE, QUEUE, PUBSUB, OTEL, stream()], auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        async with (
            raw_worker(port, SPY) as spy,
            raw_worker(port, BILLING) as billing,
            raw_worker(port, ADMIN) as admin,
        ):
            assert await register(spy, "spy::fn") is None
            assert await register(billing, "billing::fn") is None
            assert await register(admin, "admin::fn") is None
            refused = [
                (spy, "spy::fn", "state", {}),
                (spy, "spy::fn", "state", {"scope": "admin"}),
                (spy, "spy::fn", "subscribe", {"topic": "admin.events"}),
                (spy, "spy::fn", "log", {"level": "all"}),
                (spy, "spy::fn", "queue", {"topic": "admin.jobs"}),
                (spy, "spy::fn", "stream", {"stream_name": "admin"}),
                (spy, "spy::fn", "stream:join", {}),
                (spy, "spy::fn", "engine::functions-available", {}),
                (billing, "billing::fn", "state", {}),  # every scope: needs state(*)
                (billing, "billing::fn", "state", {"scope": "admin"}),
                (billing, "billing::fn", "subscribe", {"topic": "admin.events"}),
                (billing, "billing::fn", "queue", {"topic": "admin.jobs"}),
                (billing, "billing::fn", "log", {"level": "all"}),
                (billing, "billing::fn", "log", {}),
                (billing, "billing::fn", "stream", {"stream_name": "admin"}),
            ]
            for worker, function_id, trigger_type, trigger_config in refused:
                refusal = await bind(worker, trigger_type, function_id, trigger_config)
                assert refusal is not None and refusal["code"] == "forbidden", (
                    trigger_type,
                    trigger_config,
                )
            allowed = [
                (billing, "billing::fn", "state", {"scope": "billing-eu"}),
                (billing, "billing::fn", "subscribe", {"topic": "orders.eu"}),
                (billing, "billing::fn", "queue", {"topic": "billing.jobs"}),
                (billing, "billing::fn", "log", {"level": "error"}),
                (billing, "billing::fn", "stream", {"stream_name": "billing"}),
                (billing, "billing::fn", "http", {"api_path": "/b"}),
                # The default lists keep everything.
                (admin, "admin::fn", "state", {}),
                (admin, "admin::fn", "subscribe", {"topic": "admin.events"}),
                (admin, "admin::fn", "queue", {"topic": "admin.jobs"}),
                (admin, "admin::fn", "log", {}),
                (admin, "admin::fn", "stream:join", {}),
            ]
            for worker, function_id, trigger_type, trigger_config in allowed:
                refusal = await bind(worker, trigger_type, function_id, trigger_config)
                assert refusal is None, (trigger_type, trigger_config, refusal)
            # A bare type entry does not scope: billing has no "cron(...)" but may bind cron.
            assert await bind(billing, "cron", "billing::fn", {"expression": "0 0 * * * *"}) is None


async def test_without_tokens_nothing_changes() -> None:
    config = make_config([STATE, PUBSUB, stream(auth_function="w::auth")])
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        async with raw_worker(port) as worker:
            for function_id in ("w::fn", "w::auth", "stream::get(x)"):
                assert await register(worker, function_id) is None
            assert (
                await bind(worker, "state", "w::fn", {"condition_function_id": "state::get"})
                is None
            )
            assert await bind(worker, "subscribe", "w::fn", {"topic": "t"}) is None


# -- row 14: the stream auth function -----------------------------------------------------


async def stream_upgrade(port: int, secret: str) -> int:
    """The HTTP status of an upgrade to the stream port (waits past the 5 s auth timeout)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET /?token=" + secret.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: Bearer " + secret.encode() + b"\r\n\r\n"
        )
        head = b""
        with trio.fail_after(20):
            while b"\r\n" not in head:
                chunk = await stream.receive_some(1024)
                if not chunk:
                    return 0
                head += chunk
    return int(head.split(b" ")[1])


async def test_a_failing_auth_function_refuses_the_upgrade(
    tokens: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="iii.modules.stream")
    config = make_config([stream(auth_function="auth::stream")], auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.modules["stream"].server.listen_port
        # Absent: nobody registered it.
        assert await stream_upgrade(port, "client-secret-value") == 401
        record = await wait_log(caplog, "refused (401)")
        assert "function_not_found" in record.getMessage()
        mode = "error"

        async def auth(data: Any, message: dict[str, Any]) -> Any:
            if mode == "error":
                raise RuntimeError("no")
            if mode == "hang":
                await trio.sleep_forever()
            return {"null": None, "string": "yes", "ok": {"context": {"user": 1}}}[mode]

        async with (
            raw_worker(engine.listen_port, PROVIDER) as provider,
            trio.open_nursery() as nursery,
        ):
            assert await register(provider, "auth::stream") is None
            nursery.start_soon(serve, provider, {"auth::stream": auth})
            for mode in ("error", "null", "string", "hang"):
                caplog.clear()
                assert await stream_upgrade(port, "client-secret-value") == 401, mode
                record = await wait_log(caplog, "refused (401)")
                assert record.levelno == logging.WARNING
            mode = "ok"
            assert await stream_upgrade(port, "client-secret-value") == 101
            nursery.cancel_scope.cancel()
        assert not any("client-secret-value" in r.getMessage() for r in caplog.records)


async def test_only_a_token_that_names_it_may_register_the_auth_function(tokens: None) -> None:
    config = make_config([stream(auth_function="auth::stream")], auth=AUTH)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        async with raw_worker(port, ADMIN) as admin, raw_worker(port, PROVIDER) as provider:
            # The admin's register list is the bare "*": it does not name them.
            for function_id in ("auth::stream", "stream::get(secrets)", "stream::set(x)"):
                assert await register(admin, function_id) == "FORBIDDEN"
                assert await register(provider, function_id) is None
            assert await register(admin, "admin::other") is None
            assert engine.registry.functions["auth::stream"].replicas.keys() == {provider.worker_id}


async def test_join_triggers_may_be_scoped_to_a_stream() -> None:
    """``stream:join {stream_name}`` (ours) runs only for that stream's clients, so a
    ``stream:join(pattern)`` grant can be given without the other streams' contexts."""
    from trio_websocket import open_websocket

    config = make_config([stream()])
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        assert port is not None
        joins: list[str] = []

        async def on_join(data: Any, message: dict[str, Any]) -> Any:
            joins.append(data["stream_name"])
            return {"unauthorized": False}

        async with (
            raw_worker(port) as host,
            raw_worker(port) as admin,
            trio.open_nursery() as nursery,
        ):
            assert await register(host, "w::join") is None
            nursery.start_soon(serve, host, {"w::join": on_join})
            assert await bind(admin, "stream:join", "w::join", {"stream_name": "chat"}) is None
            stream_port = engine.modules["stream"].server.listen_port
            async with open_websocket("127.0.0.1", stream_port, "/", use_ssl=False) as ws:
                for name in ("other", "chat"):
                    join = {"subscriptionId": name, "streamName": name, "groupId": "g"}
                    await ws.send_message(orjson.dumps({"type": "join", "data": join}).decode())
                    with trio.fail_after(10):
                        assert orjson.loads(await ws.get_message())["event"]["type"] == "sync"
            assert joins == ["chat"]
            nursery.cancel_scope.cancel()


def test_a_job_keeps_the_name_of_its_token_and_a_lost_token_allows_nothing() -> None:
    from iii.adapters.queue import Job
    from iii.security import Authenticator

    job = Job(id="1", queue="@q", data={"a": 1}, function_id="billing::job", grant="billing")
    assert Job.from_json(orjson.loads(orjson.dumps(job.to_json()))) == job
    config = parse_config({"auth": AUTH}, env=TOKENS)
    authenticator = Authenticator(config.auth)
    billing = authenticator.grant_named("billing")
    assert billing is not None and billing.may_invoke("billing::job")
    gone = authenticator.grant_named("removed-token")
    assert gone is not None and not gone.may_invoke("billing::job")
    assert authenticator.grant_named(None) is None
    assert Authenticator(parse_config({}).auth).grant_named("billing") is None
