"""The observability module: spans, logs, metrics, exporters, SDK telemetry.

Raw protocol workers over memory streams for the engine behaviour, a small
OTLP/HTTP receiver (trio + h11, protobuf decoded with ``opentelemetry-proto``)
for the OTLP exporter, the Prometheus text parser of ``prometheus_client`` for
``/metrics``, and an official 0.25 SDK worker (its OpenTelemetry on) for the
end-to-end trace.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import orjson
import pytest
import trio
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from iii.config import parse_config
from iii.errors import ConfigError
from iii.testing import RawWorker, connect_test_worker, make_config, open_test_engine
from tests.support import start_sdk_worker

OTEL = "modules::observability::OtelModule"
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


def otel_config(**keys: Any) -> Any:
    config = {"enabled": True, "exporter": "memory", "prometheus_port": 0, **keys}
    return make_config(modules=[{"class": OTEL, "config": config}])


async def serve_calls(worker: RawWorker, seen: list[dict[str, Any]], answer: Any = None) -> None:
    """Answer every invocation the worker gets (an error if ``data`` has ``fail``)."""
    while True:
        message = await worker.receive_type("invokefunction", timeout=30)
        seen.append(message)
        reply: dict[str, Any] = {
            "type": "invocationresult",
            "invocation_id": message["invocation_id"],
            "function_id": message["function_id"],
        }
        if isinstance(message.get("data"), dict) and message["data"].get("fail"):
            reply["error"] = {"code": "boom", "message": "it failed"}
        else:
            reply["result"] = answer if answer is not None else {"ok": True}
        await worker.send(reply)


def attributes(span: dict[str, Any]) -> dict[str, Any]:
    return dict(span["attributes"])


async def ok(worker: RawWorker, function_id: str, data: Any = None, **extra: Any) -> Any:
    answer = await worker.call(function_id, {} if data is None else data, **extra)
    assert "error" not in answer, answer
    return answer.get("result")


# -- config ---------------------------------------------------------------------------


def test_config_env_fallbacks_and_strict_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_ENABLED", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_EXPORTER_TYPE", "both")
    config = parse_config({"modules": [{"class": OTEL, "config": {"service_name": "from-yaml"}}]})
    module_config = config.module_config(OTEL)
    assert module_config.enabled is True
    assert module_config.service_name == "from-yaml"  # the YAML value wins
    assert module_config.exporter == "both"
    with pytest.raises(ConfigError) as info:
        parse_config({"modules": [{"class": OTEL, "config": {"exporterr": "memory"}}]})
    assert "exporterr" in str(info.value)
    with pytest.raises(ConfigError):
        parse_config({"modules": [{"class": OTEL, "config": {"exporter": "zipkin"}}]})
    monkeypatch.setenv("OTEL_MEMORY_MAX_SPANS", "lots")
    with pytest.raises(ConfigError, match="OTEL_MEMORY_MAX_SPANS"):
        parse_config({"modules": [{"class": OTEL, "config": {}}]})


# -- spans ------------------------------------------------------------------------------


async def test_invocation_span_is_child_of_caller_and_target_gets_its_context() -> None:
    async with open_test_engine(otel_config()) as engine:
        async with connect_test_worker(engine) as caller, connect_test_worker(engine) as target:
            await target.send({"type": "registerfunction", "id": "obs::work"})
            await ok(target, "engine::functions::list")
            seen: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, target, seen)
                await ok(
                    caller,
                    "obs::work",
                    {"n": 1},
                    traceparent=TRACEPARENT,
                    baggage="tenant=acme,x=1",
                )
                failed = await caller.call("obs::work", {"fail": True}, traceparent=TRACEPARENT)
                assert failed["error"]["code"] == "boom"
                nursery.cancel_scope.cancel()

            # The target got the engine span's context (same trace, new span) and the baggage.
            forwarded = seen[0]["traceparent"].split("-")
            assert forwarded[1] == TRACE and forwarded[2] != PARENT and forwarded[3] == "01"
            assert seen[0]["baggage"] == "tenant=acme,x=1"

            tree = await ok(caller, "engine::traces::tree", {"trace_id": TRACE})
            # The caller's span was never exported: each engine span is a root under it.
            spans = {span["span_id"]: span for span in tree["roots"]}
            work = spans[forwarded[2]]
            assert work["name"] == "call obs::work" and work["parent_span_id"] == PARENT
            assert work["status"] == "ok"
            attrs_ = attributes(work)
            assert attrs_["function_id"] == "obs::work"
            assert attrs_["iii.worker.id"] == target.worker_id
            assert attrs_["iii.caller.worker_id"] == caller.worker_id
            failed_span = next(
                s for s in tree["roots"] if s["span_id"] == seen[1]["traceparent"].split("-")[2]
            )
            assert failed_span["status"] == "error"
            assert attributes(failed_span)["iii.error.code"] == "boom"


async def test_traces_list_filters_tree_and_clear() -> None:
    async with open_test_engine(otel_config()) as engine:

        async def quick(data: Any, ctx: Any) -> Any:
            return await engine.invoke("obs::inner", data, traceparent=ctx.traceparent)

        async def inner(data: Any, ctx: Any) -> Any:
            return {"inner": True}

        engine.register_function("obs::outer", quick)
        engine.register_function("obs::inner", inner)
        async with connect_test_worker(engine) as worker:
            await ok(worker, "obs::outer", {})
            listed = await ok(worker, "engine::traces::list", {})
            # Root spans only, internal (engine::) ones hidden.
            assert [span["name"] for span in listed["spans"]] == ["call obs::outer"]
            everything = await ok(worker, "engine::traces::list", {"include_internal": True})
            assert any(span["name"].startswith("call engine::") for span in everything["spans"])
            assert (await ok(worker, "engine::traces::list", {"name": "nothing-like-it"}))[
                "total"
            ] == 0
            assert (await ok(worker, "engine::traces::list", {"status": "ERR"}))["total"] == 0
            filtered = await ok(
                worker, "engine::traces::list", {"attributes": [["function_id", "obs::outer"]]}
            )
            assert filtered["total"] == 1
            trace_id = listed["spans"][0]["trace_id"]
            tree = await ok(worker, "engine::traces::tree", {"trace_id": trace_id})
            (root,) = tree["roots"]
            assert root["name"] == "call obs::outer"
            assert [child["name"] for child in root["children"]] == ["call obs::inner"]
            bad = await worker.call("engine::traces::tree", {})
            assert bad["error"]["code"] == "deserialization_error"
            assert await ok(worker, "engine::traces::clear") == {"success": True}
            assert (await ok(worker, "engine::traces::list", {}))["total"] == 0


async def test_sampling_ratio_zero_stores_no_spans_but_counts_metrics() -> None:
    async with open_test_engine(otel_config(sampling_ratio=0.0)) as engine:
        seen: list[dict[str, Any]] = []
        async with connect_test_worker(engine) as caller, connect_test_worker(engine) as target:
            await target.send({"type": "registerfunction", "id": "obs::work"})
            await ok(target, "engine::functions::list")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, target, seen)
                await ok(caller, "obs::work", {})
                nursery.cancel_scope.cancel()
            # "Not sampled" travels on (the sampled bit of the trace flags is off).
            assert int(seen[0]["traceparent"].split("-")[3], 16) & 1 == 0
            assert (await ok(caller, "engine::traces::list", {"include_internal": True}))[
                "total"
            ] == 0
            metrics = await ok(caller, "engine::metrics::list", {})
            assert metrics["engine_metrics"]["invocations"]["by_function"]["obs::work"] == 1


async def test_sampling_rules() -> None:
    sampling = {"default": 1.0, "rules": [{"operation": "call obs::noisy*", "rate": 0.0}]}
    async with open_test_engine(otel_config(sampling=sampling)) as engine:

        async def fn(data: Any, ctx: Any) -> Any:
            return None

        engine.register_function("obs::noisy_one", fn)
        engine.register_function("obs::quiet", fn)
        async with connect_test_worker(engine) as worker:
            await ok(worker, "obs::noisy_one")
            await ok(worker, "obs::quiet")
            names = [s["name"] for s in (await ok(worker, "engine::traces::list", {}))["spans"]]
            assert names == ["call obs::quiet"]
            rules = await ok(worker, "engine::sampling::rules")
            assert rules["traces"]["rules"] == [
                {"operation": "call obs::noisy*", "service": "*", "rate": 0.0}
            ]


async def test_memory_functions_need_the_memory_exporter() -> None:
    config = make_config(
        modules=[
            {
                "class": OTEL,
                "config": {
                    "enabled": True,
                    "exporter": "otlp",
                    "endpoint": "http://127.0.0.1:9",
                    "prometheus_enabled": False,
                },
            }
        ]
    )
    async with open_test_engine(config) as engine, connect_test_worker(engine) as worker:
        answer = await worker.call("engine::traces::list", {})
        assert answer["error"]["code"] == "memory_exporter_not_enabled"
        health = await ok(worker, "engine::health::check")
        assert health["status"] == "healthy"
        assert health["components"]["spans"]["status"] == "disabled"
        assert health["components"]["otel"]["details"]["exporter"] == "otlp"


# -- logs ---------------------------------------------------------------------------------


async def test_log_functions_store_and_fire_log_triggers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with open_test_engine(otel_config()) as engine:
        async with connect_test_worker(engine) as worker, connect_test_worker(engine) as handler:
            await handler.send({"type": "registerfunction", "id": "obs::on_warn"})
            await handler.send({"type": "registerfunction", "id": "obs::on_any"})
            for trigger_id, function_id, level in (
                ("t1", "obs::on_warn", "warn"),
                ("t2", "obs::on_any", "all"),
            ):
                await handler.send(
                    {
                        "type": "registertrigger",
                        "id": trigger_id,
                        "trigger_type": "log",
                        "function_id": function_id,
                        "config": {"level": level},
                    }
                )
            await handler.send(
                {
                    "type": "registertrigger",
                    "id": "t3",
                    "trigger_type": "log",
                    "function_id": "obs::on_any",
                    "config": {"level": "loud"},
                }
            )
            refused = await handler.receive_type("triggerregistrationresult")
            assert refused["id"] == "t3" and "level" in refused["error"]["message"]

            seen: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_calls, handler, seen)
                await ok(
                    worker,
                    "engine::log::warn",
                    {"message": "disk low", "data": {"free": 3}, "service_name": "svc"},
                )
                await ok(worker, "engine::log::debug", {"message": "details"})
                ours = ("disk low", "details")

                def delivered() -> dict[str, list[str]]:
                    # Engine log records (the refused trigger's warning) fire triggers too.
                    by_function: dict[str, list[str]] = {}
                    for message in seen:
                        if message["data"]["body"] in ours:
                            by_function.setdefault(message["function_id"], []).append(
                                message["data"]["body"]
                            )
                    return by_function

                with trio.fail_after(10):
                    while sum(map(len, delivered().values())) < 3:
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            by_function = delivered()
            assert any(
                "refused" in m["data"]["body"] for m in seen if m["function_id"] == "obs::on_warn"
            )
            assert by_function["obs::on_warn"] == ["disk low"]
            assert sorted(by_function["obs::on_any"]) == ["details", "disk low"]
            payload = next(
                m["data"]
                for m in seen
                if m["function_id"] == "obs::on_warn" and m["data"]["body"] == "disk low"
            )
            assert payload["severity_text"] == "WARN" and payload["severity_number"] == 13
            assert payload["attributes"] == {"free": 3} and payload["service_name"] == "svc"
            assert "_caller_worker_id" not in payload  # trigger payloads arrive as published

            logs = await ok(worker, "engine::logs::list", {"severity_min": 13})
            assert [entry["body"] for entry in logs["logs"] if entry["service_name"] == "svc"] == [
                "disk low"
            ]
            # The log carries the trace of the engine::log call that made it.
            entry = next(e for e in logs["logs"] if e["body"] == "disk low")
            assert len(entry["trace_id"]) == 32 and len(entry["span_id"]) == 16
            assert any(
                "disk low" in r.getMessage() for r in caplog.records if r.name == "iii.worker_log"
            )

            # The engine's own log records land in the store too.
            await worker.send(
                {"type": "invokefunction", "function_id": "nope::missing", "data": {}}
            )
            with trio.fail_after(10):
                while True:
                    logs = await ok(worker, "engine::logs::list", {})
                    engine_logs = [e for e in logs["logs"] if "nope::missing" in str(e["body"])]
                    if engine_logs:
                        break
                    await trio.sleep(0.05)
            assert engine_logs[0]["attributes"]["logger"] == "iii.worker_calls"
            assert await ok(worker, "engine::logs::clear") == {"success": True}
            assert all(
                "disk low" != e["body"]
                for e in (await ok(worker, "engine::logs::list", {}))["logs"]
            )


# -- SDK telemetry ingestion -----------------------------------------------------------------


def otlp_span(trace: str, span: str, parent: str | None, name: str) -> dict[str, Any]:
    out = {
        "traceId": trace,
        "spanId": span,
        "name": name,
        "kind": 2,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000000500000000",
        "attributes": [
            {"key": "function_id", "value": {"stringValue": "sdk::fn"}},
            {"key": "n", "value": {"intValue": "3"}},
        ],
        "status": {"code": 1},
    }
    if parent:
        out["parentSpanId"] = parent
    return out


def otlp_frame(*spans: dict[str, Any], service: str = "sdk-worker") -> bytes:
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": service}}]
                },
                "scopeSpans": [
                    {"scope": {"name": "iii-py", "version": "0.25.0"}, "spans": list(spans)}
                ],
            }
        ]
    }
    return b"OTLP" + orjson.dumps(body)


async def test_sdk_frames_land_in_the_same_stores() -> None:
    async with open_test_engine(otel_config()) as engine:
        async with (
            connect_test_worker(engine) as worker,
            connect_test_worker(engine, "/otel") as otel,
        ):
            await ok(worker, "engine::functions::list")
            await otel.send(otlp_frame(otlp_span(TRACE, "1111111111111111", None, "sdk root")))
            # The same kind of frame on the worker socket, with a child span.
            await worker.send(
                otlp_frame(otlp_span(TRACE, "2222222222222222", "1111111111111111", "sdk child"))
            )
            await otel.send(b"OTLP{not json")  # logged and dropped
            logs = {
                "resourceLogs": [
                    {
                        "resource": {
                            "attributes": [
                                {"key": "service.name", "value": {"stringValue": "sdk-worker"}}
                            ]
                        },
                        "scopeLogs": [
                            {
                                "scope": {"name": "iii"},
                                "logRecords": [
                                    {
                                        "timeUnixNano": "1700000000100000000",
                                        "severityNumber": 17,
                                        "severityText": "ERROR",
                                        "body": {"stringValue": "sdk failure"},
                                        "traceId": TRACE,
                                        "spanId": "2222222222222222",
                                    }
                                ],
                            }
                        ],
                    }
                ]
            }
            await otel.send(b"LOGS" + orjson.dumps(logs))
            metrics = {
                "resourceMetrics": [
                    {
                        "resource": {
                            "attributes": [
                                {"key": "service.name", "value": {"stringValue": "sdk-worker"}}
                            ]
                        },
                        "scopeMetrics": [
                            {
                                "metrics": [
                                    {
                                        "name": "worker.cpu",
                                        "unit": "%",
                                        "gauge": {
                                            "dataPoints": [
                                                {
                                                    "asDouble": 12.5,
                                                    "timeUnixNano": str(time.time_ns()),
                                                }
                                            ]
                                        },
                                    }
                                ]
                            }
                        ],
                    }
                ]
            }
            await otel.send(b"MTRC" + orjson.dumps(metrics))
            with trio.fail_after(10):
                while engine.telemetry.counts["MTRC"] < 1:
                    await trio.sleep(0.02)
            tree = await ok(worker, "engine::traces::tree", {"trace_id": TRACE})
            (root,) = tree["roots"]
            assert root["name"] == "sdk root" and root["service_name"] == "sdk-worker"
            assert [child["name"] for child in root["children"]] == ["sdk child"]
            assert attributes(root)["n"] == 3
            assert root["instrumentation_scope_name"] == "iii-py"
            listed = await ok(worker, "engine::logs::list", {"trace_id": TRACE})
            assert [entry["body"] for entry in listed["logs"]] == ["sdk failure"]
            assert listed["logs"][0]["span_id"] == "2222222222222222"
            metrics_list = await ok(worker, "engine::metrics::list", {"metric_name": "worker.cpu"})
            (point,) = metrics_list["sdk_metrics"]
            assert point["value"] == 12.5 and point["service_name"] == "sdk-worker"
            # The engine still serves after the malformed frame.
            assert (await ok(worker, "engine::health::check"))["status"] == "healthy"


# -- metrics and Prometheus -----------------------------------------------------------------


async def http_get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    connection = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = h11.Request(method="GET", target=target, headers=[("Host", "127.0.0.1")])
        await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, b""
        with trio.fail_after(10):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, headers, body


async def test_metrics_list_and_prometheus_endpoint() -> None:
    async with open_test_engine(otel_config()) as engine:

        async def flaky(data: Any, ctx: Any) -> Any:
            if data.get("fail"):
                raise __import__("iii.errors").errors.IIIError("nope", code="flaky_failed")
            return 1

        engine.register_function("obs::flaky", flaky)
        async with connect_test_worker(engine) as worker:
            for fail in (False, False, True):
                await worker.call("obs::flaky", {"fail": fail})
            metrics = await ok(worker, "engine::metrics::list", {})
            invocations = metrics["engine_metrics"]["invocations"]
            assert invocations["by_function"]["obs::flaky"] == 3
            assert invocations["error"] >= 1
            assert metrics["engine_metrics"]["workers"]["active"] == 1
            assert metrics["engine_metrics"]["performance"]["max_duration_ms"] > 0

            port = engine.modules["observability"].prometheus_port
            status, headers, body = await http_get(port, "/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
            families = {
                family.name: family for family in text_string_to_metric_families(body.decode())
            }
            samples = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in families.values()
                for sample in family.samples
            }
            assert (
                samples[
                    ("iii_invocations_total", (("function_id", "obs::flaky"), ("status", "ok")))
                ]
                == 2
            )
            assert (
                samples[
                    ("iii_invocations_total", (("function_id", "obs::flaky"), ("status", "error")))
                ]
                == 1
            )
            assert (
                samples[
                    (
                        "iii_invocation_errors_total",
                        (("error_code", "flaky_failed"), ("function_id", "obs::flaky")),
                    )
                ]
                == 1
            )
            assert (
                samples[("iii_invocation_duration_seconds_count", (("function_id", "obs::flaky"),))]
                == 3
            )
            assert samples[("iii_workers_active", ())] == 1
            assert ("iii_module_observability_logs_stored", ()) in samples
            assert (await http_get(port, "/other"))[0] == 404


# -- OTLP export ------------------------------------------------------------------------------


@attrs.define
class Received:
    requests: list[tuple[str, str, bytes]] = attrs.field(factory=list)

    def traces(self) -> list[Any]:
        spans = []
        for path, _, body in self.requests:
            if path == "/v1/traces":
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    service = next(
                        (
                            a.value.string_value
                            for a in resource_spans.resource.attributes
                            if a.key == "service.name"
                        ),
                        "",
                    )
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            spans.append((service, span))
        return spans

    def logs(self) -> list[Any]:
        records = []
        for path, _, body in self.requests:
            if path == "/v1/logs":
                request = ExportLogsServiceRequest()
                request.ParseFromString(body)
                for resource_logs in request.resource_logs:
                    for scope_logs in resource_logs.scope_logs:
                        records.extend(scope_logs.log_records)
        return records


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[int, Received]]:
    """A minimal OTLP/HTTP collector: records each POST, answers 200 with an empty body."""
    received = Received()

    async def handle(stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        async with stream:
            with trio.move_on_after(10):
                while True:
                    path, content_type, body = "", "", b""
                    while True:
                        event = connection.next_event()
                        if event is h11.NEED_DATA:
                            data = await stream.receive_some(65536)
                            if not data:
                                return
                            connection.receive_data(data)
                        elif isinstance(event, h11.Request):
                            path = event.target.decode()
                            content_type = dict(event.headers).get(b"content-type", b"").decode()
                        elif isinstance(event, h11.Data):
                            body += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        elif isinstance(event, h11.ConnectionClosed):
                            return
                    received.requests.append((path, content_type, body))
                    response = h11.Response(
                        status_code=200,
                        headers=[
                            ("Content-Type", "application/x-protobuf"),
                            ("Content-Length", "0"),
                        ],
                    )
                    await stream.send_all(
                        connection.send(response) + connection.send(h11.EndOfMessage())
                    )
                    if connection.our_state is h11.MUST_CLOSE:
                        return
                    connection.start_next_cycle()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        port = listeners[0].socket.getsockname()[1]
        yield port, received
        nursery.cancel_scope.cancel()


async def test_otlp_exporter_sends_engine_and_sdk_spans_and_logs_to_a_receiver() -> None:
    async with otlp_receiver() as (port, received):
        config = otel_config(
            exporter="both",
            endpoint=f"http://127.0.0.1:{port}",
            logs_exporter="both",
            service_name="iii-test",
        )
        async with open_test_engine(config) as engine:
            async with connect_test_worker(engine) as caller, connect_test_worker(engine) as target:
                await target.send({"type": "registerfunction", "id": "obs::work"})
                await ok(target, "engine::functions::list")
                seen: list[dict[str, Any]] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(serve_calls, target, seen)
                    await ok(caller, "obs::work", {}, traceparent=TRACEPARENT)
                    nursery.cancel_scope.cancel()
                engine_span_id = seen[0]["traceparent"].split("-")[2]
                # The worker reports its span, child of the engine's.
                await target.send(
                    otlp_frame(
                        otlp_span(TRACE, "3333333333333333", engine_span_id, "execute obs::work")
                    )
                )
                await ok(caller, "engine::log::error", {"message": "exported log"})
                with trio.fail_after(10):
                    while engine.telemetry.counts["OTLP"] < 1:
                        await trio.sleep(0.02)
        # The engine has stopped: its exporters flushed on the way out.
        spans = received.traces()
        by_id = {span.span_id.hex(): (service, span) for service, span in spans}
        service, engine_span = by_id[engine_span_id]
        assert service == "iii-test" and engine_span.name == "call obs::work"
        assert engine_span.trace_id.hex() == TRACE and engine_span.parent_span_id.hex() == PARENT
        worker_service, worker_span = by_id["3333333333333333"]
        assert worker_service == "sdk-worker" and worker_span.parent_span_id.hex() == engine_span_id
        assert any(record.body.string_value == "exported log" for record in received.logs())


# -- end to end with the official SDK ------------------------------------------------------------

WORKER_025 = """
import sys, json
from iii import register_worker, InitOptions

iii = register_worker(sys.argv[1], InitOptions(worker_name="obs025"))

def work(data):
    return {"doubled": data["n"] * 2}

iii.register_function("obs025::work", work, description="doubles")
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    out = iii.trigger({"function_id": cmd["fn"], "payload": cmd["data"]})
    print("OK " + json.dumps(out), flush=True)
iii.shutdown()
"""


async def wait_tree(worker: RawWorker, trace_id: str, predicate: Any, timeout: float = 30) -> Any:
    with trio.fail_after(timeout):
        while True:
            tree = await ok(worker, "engine::traces::tree", {"trace_id": trace_id})
            if predicate(tree):
                return tree
            await trio.sleep(0.1)


def flatten(nodes: list[dict[str, Any]], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for node in nodes:
        out.append((depth, node))
        out.extend(flatten(node["children"], depth + 1))
    return out


@pytest.mark.sdk
async def test_sdk_025_worker_span_sits_under_the_engine_span() -> None:
    async with open_test_engine(otel_config(memory_max_spans=5000)) as engine:
        url = f"ws://127.0.0.1:{engine.listen_port}"
        env = {"OTEL_ENABLED": "true", "OTEL_SERVICE_NAME": "obs025-worker"}
        async with start_sdk_worker("0.25.0", WORKER_025, url=url, env=env) as sdk:
            await sdk.wait_for("READY", timeout=40)
            with trio.fail_after(30):
                while "obs025::work" not in engine.registry.functions:
                    await trio.sleep(0.05)
            async with connect_test_worker(engine) as caller:
                # 1. The engine calls the worker: engine span -> the worker's span.
                answer = await ok(caller, "obs025::work", {"n": 21}, traceparent=TRACEPARENT)
                assert answer == {"doubled": 42}

                def has_worker_span(tree: Any) -> bool:
                    return any(
                        s["service_name"] == "obs025-worker" for _, s in flatten(tree["roots"])
                    )

                tree = await wait_tree(caller, TRACE, has_worker_span)
                nodes = flatten(tree["roots"])
                engine_span = next(s for _, s in nodes if s["name"] == "call obs025::work")
                assert engine_span["parent_span_id"] == PARENT
                worker_spans = [s for _, s in nodes if s["service_name"] == "obs025-worker"]
                assert any(
                    s.get("parent_span_id") == engine_span["span_id"] for s in worker_spans
                ), nodes
                assert all(s["trace_id"] == TRACE for _, s in nodes)

                # 2. The worker calls through the engine.  The 0.25 SDK sends no
                # traceparent of its own for an outgoing call made outside a
                # span, so the engine span is the root, with the worker's
                # ``execute`` span (the same worker serving it) beneath.
                await sdk.send_line(json.dumps({"fn": "obs025::work", "data": {"n": 2}}))
                assert (await sdk.wait_for("OK ")) == 'OK {"doubled": 4}'
                (sdk_worker_id,) = engine.registry.functions["obs025::work"].replicas

                def called_by_sdk(span: dict[str, Any]) -> bool:
                    return (
                        span["name"] == "call obs025::work"
                        and attributes(span).get("iii.caller.worker_id") == sdk_worker_id
                    )

                with trio.fail_after(30):
                    while True:
                        listed = await ok(
                            caller,
                            "engine::traces::list",
                            {"name": "call obs025::work", "limit": 50},
                        )
                        roots = [s for s in listed["spans"] if called_by_sdk(s)]
                        if roots:
                            tree = await ok(
                                caller, "engine::traces::tree", {"trace_id": roots[0]["trace_id"]}
                            )
                            if has_worker_span(tree):
                                break
                        await trio.sleep(0.1)
                (root,) = tree["roots"]
                assert called_by_sdk(root) and "parent_span_id" not in root
                assert [child["service_name"] for child in root["children"]] == ["obs025-worker"]
