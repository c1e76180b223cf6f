"""The REST module against raw protocol workers: payloads, answers, errors,
hot routes, conditions, CORS, limits and shutdown.  (The official SDKs drive
the same paths in ``test_rest_sdk.py``.)"""

from __future__ import annotations

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from iii.testing import connect_test_worker
from tests.modules.rest_api.helpers import (
    add_route,
    open_rest_engine,
    open_worker,
    wait_until,
)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"code", "message", "error_id"}, body
    assert response.headers["content-type"] == "application/json"
    return body["error"]


async def test_get_payload_is_the_spec_shape():
    seen = []

    async def handler(data):
        seen.append(data)
        return {"status_code": 201, "body": {"ok": True}, "headers": {"X-Answer": "42"}}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::get": handler}) as worker,
    ):
        await add_route(engine, worker, "t::get", "/items/:id")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/items/a%20b?q=1&q=2&empty=", headers={"X-Custom": "v"})
        assert response.status_code == 201
        assert response.json() == {"ok": True}
        assert response.headers["x-answer"] == "42"
        assert response.headers["content-type"] == "application/json"
        (data,) = seen
        assert data["path"] == "/items/:id"
        assert data["path_params"] == {"id": "a b"}
        assert data["query_params"] == {"q": "2", "empty": ""}
        assert data["headers"]["x-custom"] == "v"
        assert data["headers"]["host"].startswith("127.0.0.1:")
        assert data["method"] == "GET"
        assert data["body"] is None
        assert data["trigger"] == {"type": "http", "path": "/items/:id", "method": "GET"}
        assert data["request_body"]["direction"] == "read"
        assert data["response"]["direction"] == "write"
        assert set(data["request_body"]) == {"channel_id", "access_key", "direction"}
        assert "_caller_worker_id" not in data
        # The request's channels are gone once it is answered.
        await wait_until(lambda: len(engine.channels) == 0)


async def test_defaults_and_header_list_form():
    async def defaults(data):
        return {}

    async def listed(data):
        return {
            "status_code": 200,
            "body": "text",
            "headers": [
                "Set-Cookie: a=1",
                "Set-Cookie: b=2",
                "Content-Type: text/plain; charset=utf-8",
            ],
        }

    handlers = {"t::defaults": defaults, "t::listed": listed}
    async with open_rest_engine() as (engine, base), open_worker(engine, handlers) as worker:
        await add_route(engine, worker, "t::defaults", "defaults")  # no leading slash
        await add_route(engine, worker, "t::listed", "/listed")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/defaults")
            assert (response.status_code, response.json()) == (200, {})
            response = await client.get("/listed")
        assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.content == b'"text"'  # the body is always sent as JSON


async def test_post_json_body_is_parsed_and_bad_json_is_null():
    seen = []

    async def handler(data):
        seen.append(data["body"])
        return {"status_code": 200, "body": data["body"]}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::post": handler}) as worker,
    ):
        await add_route(engine, worker, "t::post", "/post", "post")  # method in any case
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.post("/post", json={"a": [1, 2], "b": "é"})
            assert response.json() == {"a": [1, 2], "b": "é"}
            response = await client.post(
                "/post",
                content=b"{not json",
                headers={"content-type": "application/json; charset=utf-8"},
            )
            assert response.status_code == 200
        assert seen == [{"a": [1, 2], "b": "é"}, None]


async def test_error_answers_have_one_shape():
    async def boom(data):
        raise RuntimeError("secret detail")

    async def not_an_object(data):
        return [1, 2]

    async def bad_status(data):
        return {"status_code": 42}

    handlers = {"t::boom": boom, "t::list": not_an_object, "t::status": bad_status}
    async with open_rest_engine() as (engine, base), open_worker(engine, handlers) as worker:
        await add_route(engine, worker, "t::boom", "/boom", "POST")
        await add_route(engine, worker, "t::list", "/list")
        await add_route(engine, worker, "t::status", "/status")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/nowhere")
            assert response.status_code == 404
            assert error_of(response)["code"] == "NOT_FOUND"

            response = await client.get("/boom")
            assert response.status_code == 405
            assert error_of(response)["code"] == "METHOD_NOT_ALLOWED"
            assert response.headers["allow"] == "POST"

            response = await client.post("/boom")
            assert response.status_code == 500
            error = error_of(response)
            assert error["code"] == "INTERNAL_ERROR"
            assert "secret detail" not in response.text

            for path in ("/list", "/status"):
                response = await client.get(path)
                assert response.status_code == 500
                assert error_of(response)["code"] == "INTERNAL_ERROR"

            # No built-in route (upstream's 0.25 SDK suite checks it): the
            # engine's health is on the metrics port.
            response = await client.get("/health")
            assert response.status_code == 404
            assert error_of(response)["code"] == "NOT_FOUND"


async def test_a_worker_may_route_health():
    async def health(data):
        return {"body": {"mine": True}}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::health": health}) as worker,
    ):
        await add_route(engine, worker, "t::health", "/health")
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/health")).json() == {"mine": True}


async def test_null_result_without_channel_is_504():
    async def silent(data):
        return None

    async with (
        open_rest_engine(default_timeout=300) as (engine, base),
        open_worker(engine, {"t::silent": silent}) as worker,
    ):
        await add_route(engine, worker, "t::silent", "/silent")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/silent")
        assert response.status_code == 504
        assert error_of(response)["code"] == "TIMEOUT"


async def test_slow_function_is_504_and_the_engine_keeps_serving():
    release = trio.Event()

    async def slow(data):
        await release.wait()
        return {"body": "late"}

    async def fast(data):
        return {"body": "fast"}

    async with (
        open_rest_engine(default_timeout=300) as (engine, base),
        open_worker(engine, {"t::slow": slow, "t::fast": fast}) as worker,
    ):
        await add_route(engine, worker, "t::slow", "/slow")
        await add_route(engine, worker, "t::fast", "/fast")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.get("/slow")
            assert response.status_code == 504
            release.set()
            assert (await client.get("/fast")).json() == "fast"


async def test_routes_come_and_go_while_serving():
    async def handler(data):
        return {"body": "here"}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::hot": handler}) as worker,
    ):
        trigger_id = await add_route(engine, worker, "t::hot", "/hot")
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/hot")).status_code == 200
            await worker.send(
                {"type": "unregistertrigger", "id": trigger_id, "trigger_type": "http"}
            )
            await wait_until(lambda: len(engine.modules["rest_api"].routes) == 0)
            assert (await client.get("/hot")).status_code == 404
            await add_route(engine, worker, "t::hot", "/hot", trigger_id=trigger_id)
            assert (await client.get("/hot")).status_code == 200


async def test_route_conflict_is_refused_and_replicas_share_a_route():
    async def handler(data):
        return {"body": "first"}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::one": handler}) as first,
    ):
        await add_route(engine, first, "t::one", "/thing/:id")
        async with connect_test_worker(engine) as second:
            await second.send({"type": "registerfunction", "id": "t::two"})
            await second.send(
                {
                    "type": "registertrigger",
                    "id": "trig-two",
                    "trigger_type": "http",
                    "function_id": "t::two",
                    "config": {"api_path": "thing/:other", "http_method": "GET"},
                }
            )
            result = await second.receive_type("triggerregistrationresult")
            assert result["id"] == "trig-two"
            assert result["error"]["code"] == "trigger_registration_failed"
            assert "conflicts with GET /thing/:id of function t::one" in result["error"]["message"]

            # A replica of the same function and route is not a conflict.
            await second.send({"type": "registerfunction", "id": "t::one"})
            await second.send(
                {
                    "type": "registertrigger",
                    "id": "trig-replica",
                    "trigger_type": "http",
                    "function_id": "t::one",
                    "config": {"api_path": "/thing/:id", "http_method": "GET"},
                }
            )
            with pytest.raises(trio.TooSlowError):
                await second.receive_type("triggerregistrationresult", timeout=0.3)
            assert len(engine.modules["rest_api"].routes) == 1
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/thing/1")).json() == "first"


async def test_bad_trigger_configs_are_refused():
    async with open_rest_engine() as (engine, base), connect_test_worker(engine) as worker:
        await worker.send({"type": "registerfunction", "id": "t::x"})
        for index, config in enumerate(
            [
                {"http_method": "GET"},
                {"api_path": "/a", "http_method": "BREW"},
                "nope",
                {"api_path": "/a/:x/:x"},
            ]
        ):
            await worker.send(
                {
                    "type": "registertrigger",
                    "id": f"bad-{index}",
                    "trigger_type": "http",
                    "function_id": "t::x",
                    "config": config,
                }
            )
            result = await worker.receive_type("triggerregistrationresult")
            assert result["id"] == f"bad-{index}" and result["error"]["message"]
        assert len(engine.modules["rest_api"].routes) == 0


async def test_condition_function_gates_the_route():
    calls = []

    async def handler(data):
        calls.append(data["query_params"])
        return {"body": "ran"}

    async def condition(data):
        assert "request_body" not in data and "response" not in data
        return data["query_params"].get("allow") == "yes"

    async with (
        open_rest_engine() as (engine, base),
        open_worker(
            engine, {"t::gated": handler, "t::cond": condition, "t::gated2": handler}
        ) as worker,
    ):
        await worker.send({"type": "registerfunction", "id": "t::cond"})
        await add_route(engine, worker, "t::gated", "/gated", _condition_path="t::cond")
        await add_route(engine, worker, "t::gated2", "/gated2", condition_function_id="t::cond")
        async with httpx.AsyncClient(base_url=base) as client:
            for path in ("/gated", "/gated2"):
                response = await client.get(path, params={"allow": "no"})
                assert response.status_code == 422
                assert error_of(response)["code"] == "CONDITION_NOT_MET"
                assert response.json()["skipped"] is True
                response = await client.get(path, params={"allow": "yes"})
                assert response.json() == "ran"
        assert calls == [{"allow": "yes"}, {"allow": "yes"}]


async def test_cors_permissive_by_default():
    async def handler(data):
        return {"body": 1}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::c": handler}) as worker,
    ):
        await add_route(engine, worker, "t::c", "/c", "PUT")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.options(
                "/c",
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "PUT",
                    "Access-Control-Request-Headers": "x-token, content-type",
                },
            )
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "*"
            assert response.headers["access-control-allow-methods"] == "PUT"
            assert response.headers["access-control-allow-headers"] == "x-token, content-type"
            response = await client.put("/c", headers={"Origin": "https://app.example"})
            assert response.headers["access-control-allow-origin"] == "*"


async def test_cors_with_configured_origins_and_methods():
    async def handler(data):
        return {"body": 1}

    cors = {"allowed_origins": ["https://good.example"], "allowed_methods": ["GET", "POST"]}
    async with (
        open_rest_engine(cors=cors) as (engine, base),
        open_worker(engine, {"t::c": handler}) as worker,
    ):
        await add_route(engine, worker, "t::c", "/c", "POST")
        async with httpx.AsyncClient(base_url=base) as client:
            good = {"Origin": "https://good.example", "Access-Control-Request-Method": "POST"}
            response = await client.options("/c", headers=good)
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "https://good.example"
            assert "origin" in response.headers["vary"]

            response = await client.options(
                "/c", headers={**good, "Origin": "https://evil.example"}
            )
            assert response.status_code == 403
            assert "https://evil.example" in error_of(response)["message"]
            response = await client.options(
                "/c", headers={**good, "Access-Control-Request-Method": "DELETE"}
            )
            assert response.status_code == 403

            response = await client.post("/c", headers={"Origin": "https://good.example"})
            assert response.headers["access-control-allow-origin"] == "https://good.example"
            response = await client.post("/c", headers={"Origin": "https://evil.example"})
            assert response.status_code == 200
            assert "access-control-allow-origin" not in response.headers


async def test_body_limit_is_413():
    async def handler(data):
        reader = data["request_body"]
        return {"body": reader["direction"]}

    async with (
        open_rest_engine(max_body_size=1000) as (engine, base),
        open_worker(engine, {"t::up": handler}) as worker,
    ):
        await add_route(engine, worker, "t::up", "/up", "POST")
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.post("/up", content=b"x" * 1001)  # content-length known
            assert response.status_code == 413
            assert error_of(response)["code"] == "PAYLOAD_TOO_LARGE"
            response = await client.post("/up", json={"k": "x" * 1000})
            assert response.status_code == 413
            # (a chunked body going over mid-stream: test_rest_streaming.py)
            response = await client.post("/up", content=b"z" * 1000)
            assert response.status_code == 200


async def test_concurrency_limit_makes_requests_wait():
    running = 0
    peak = 0

    async def handler(data):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        with trio.fail_after(15):  # two at once for sure: the limit is reached
            while peak < 2:
                await trio.sleep(0.01)
        await trio.sleep(0.05)  # holds its slot: a third request now would overlap
        running -= 1
        return {"body": "done"}

    async with (
        open_rest_engine(concurrency_request_limit=2) as (engine, base),
        open_worker(engine, {"t::busy": handler}) as worker,
    ):
        await add_route(engine, worker, "t::busy", "/busy")
        results = []
        async with httpx.AsyncClient(
            base_url=base, limits=httpx.Limits(max_connections=10)
        ) as client:

            async def one():
                results.append((await client.get("/busy")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
        assert results == [200] * 8
        assert peak == 2


async def test_shutdown_lets_requests_in_flight_finish():
    entered = trio.Event()
    release = trio.Event()

    async def slow(data):
        entered.set()
        await release.wait()
        return {"body": "finished"}

    async with open_rest_engine() as (engine, base):
        async with connect_test_worker(engine) as worker, trio.open_nursery() as nursery:
            from tests.modules.rest_api.helpers import answer_calls

            async def answer_until_the_engine_closes() -> None:
                # Once the request is answered, shutdown closes the worker (1012).
                try:
                    await answer_calls(worker, {"t::slow": slow})
                except* ConnectionClosed:
                    pass

            nursery.start_soon(answer_until_the_engine_closes)
            await add_route(engine, worker, "t::slow", "/slow")
            results = []

            async def call() -> None:
                async with httpx.AsyncClient(base_url=base) as client:
                    results.append(await client.get("/slow"))

            nursery.start_soon(call)
            await entered.wait()
            engine.request_shutdown()
            await engine.shutting_down.wait()
            port = engine.modules["rest_api"].port
            with trio.fail_after(5):
                while True:  # intake stops
                    try:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        break
                    await stream.aclose()
                    await trio.sleep(0.01)
            release.set()
            await wait_until(lambda: bool(results))
            nursery.cancel_scope.cancel()
        assert results[0].status_code == 200
        assert results[0].json() == "finished"
        assert results[0].headers["connection"] == "close"


async def test_json_body_too_large_for_the_worker_is_413():
    async def handler(data):
        return {"body": "never"}

    async with (
        open_rest_engine() as (engine, base),
        open_worker(engine, {"t::big": handler}) as worker,
    ):
        await add_route(engine, worker, "t::big", "/big", "POST")
        async with httpx.AsyncClient(base_url=base) as client:
            # A raw worker, like 0.4.1, takes messages of at most 1 MiB.
            response = await client.post("/big", json={"blob": "x" * (1536 * 1024)})
            assert response.status_code == 413
            assert "exceeds this worker's limit" in error_of(response)["message"]
            response = await client.post("/big", json={"blob": "small"})
            assert response.json() == "never"
