"""Byte bounds of the observability module's stores (``iii.modules.observability.bounds``).

Properties of the cutting functions (hypothesis: any text, any JSON-ish
record, any limit), each store's accounting and eviction, the config keys,
and, through an in-memory engine, what ``engine::log::*`` answers and how
much the log trigger queue may hold.  The attacks themselves are replayed
against a real engine process in ``tests/test_hostile_logstore.py``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanContext, TraceFlags

from iii.config import parse_config
from iii.errors import ConfigError
from iii.modules.observability.bounds import (
    NOTE_KEY,
    BoundedRing,
    cut_text,
    encode_json,
    fit_mapping,
    fit_record,
)
from iii.modules.observability.logs import LogStore, make_entry
from iii.modules.observability.metrics import (
    MAX_POINT_BYTES,
    MAX_SERIES,
    OTHER,
    EngineMetrics,
    SdkMetricStore,
)
from iii.modules.observability.span_bounds import fit_span, span_bytes
from iii.modules.observability.spans import SpanStore, span_to_json
from iii.testing import connect_test_worker, make_config, open_test_engine

OTEL = "modules::observability::OtelModule"
KiB = 1024
MiB = 1024 * KiB

# Text a peer may send: any code point orjson can read, controls and wide
# characters included, and text that grows when escaped.
text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=3000
) | st.sampled_from(["\x00" * 500, "é" * 2000, "\U0001f600" * 700, '"\\' * 600])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=12,
)


def entry_of(body: Any, attributes: dict[str, Any], service: str) -> dict[str, Any]:
    return make_entry(
        body=body,
        severity_number=9,
        severity_text="INFO",
        resource={"service.name": service},
        attributes=attributes,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
    )


# -- cutting -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(value=text, limit=st.integers(min_value=2, max_value=4000))
def test_cut_text_keeps_the_longest_head_that_fits(value: str, limit: int) -> None:
    head, left_out = cut_text(value, limit)
    assert value.startswith(head) and len(head) + left_out == len(value)
    assert len(orjson.dumps(head)) <= limit
    if left_out:  # one more character would not fit
        assert len(orjson.dumps(value[: len(head) + 1])) > limit or len(head) >= limit


@settings(max_examples=300, deadline=None)
@given(
    body=text | json_values,
    attributes=st.dictionaries(st.text(max_size=300), json_values | text, max_size=8),
    service=text,
    limit=st.integers(min_value=4 * KiB, max_value=16 * KiB),
)
def test_fit_record_is_within_its_limit_and_keeps_what_fits(
    body: Any, attributes: dict[str, Any], service: str, limit: int
) -> None:
    entry = entry_of(body, attributes, service)
    fitted = fit_record(entry, limit, main="body", secondary=("resource",))
    assert len(fitted.encoded) <= limit
    assert orjson.loads(fitted.encoded) == orjson.loads(encode_json(fitted.record)[1])
    whole = encode_json(entry)[1]
    if len(whole) <= limit:
        assert not fitted.truncated and fitted.encoded == whole
        return
    assert fitted.truncated and fitted.original_bytes == len(whole)
    record = fitted.record
    assert NOTE_KEY in record["attributes"]
    for key in ("timestamp_unix_nano", "severity_number", "trace_id", "span_id"):
        assert record[key] == entry[key]
    if isinstance(body, str) and isinstance(record["body"], str):
        head = record["body"].rsplit("… (", 1)[0]
        assert body.startswith(head)


def test_fit_record_shares_the_room_between_body_and_attributes() -> None:
    entry = entry_of("b" * MiB, {"small": 1, "blob": "a" * MiB, "code": "E42"}, "svc")
    fitted = fit_record(entry, 64 * KiB, main="body", secondary=("resource",))
    record = fitted.record
    assert len(fitted.encoded) <= 64 * KiB
    assert record["body"].startswith("bbb") and record["body"].endswith("more chars)")
    attributes = record["attributes"]
    # The small attributes are kept whole, the blob is cut, and both halves are used.
    assert attributes["small"] == 1 and attributes["code"] == "E42"
    assert 20 * KiB < len(record["body"]) and 20 * KiB < len(attributes["blob"])
    assert record["resource"] == {"service.name": "svc"} and record["service_name"] == "svc"


def test_values_orjson_refuses_are_stored_scrubbed() -> None:
    entry = entry_of("x", {"big": 2**80, "lone": "a\ud800b"}, "svc")
    fitted = fit_record(entry, 64 * KiB, main="body")
    attributes = orjson.loads(fitted.encoded)["attributes"]
    assert attributes == {"big": str(2**80), "lone": "a?b"}


def test_fit_mapping_keeps_small_items_whole_and_cuts_the_first_long_string() -> None:
    mapping = {"long": "x" * 5000, "n": 1, "other": "y" * 5000, "flag": True}
    kept, changed = fit_mapping(mapping, 1000)
    assert list(kept) == ["long", "n", "flag"] and changed == 2
    assert kept["long"].endswith("more chars)") and len(orjson.dumps(kept)) <= 1000


def test_bounded_ring_evicts_oldest_first_by_count_and_bytes() -> None:
    ring = BoundedRing[int](max_count=10, max_bytes=100)
    for item in range(8):
        ring.add(item, 20)
    assert list(ring) == [3, 4, 5, 6, 7] and ring.bytes == 100 and ring.evicted == 3
    ring.add(8, 100)
    assert list(ring) == [8] and ring.bytes == 100
    ring.add(9, 150)  # the newest is kept, even alone over the bound
    assert list(ring) == [9] and ring.bytes == 150
    ring.clear()
    assert len(ring) == 0 and ring.bytes == 0


# -- stores ------------------------------------------------------------------------------------


def test_log_store_stays_within_its_bytes_and_keeps_the_newest() -> None:
    store = LogStore(1000, max_bytes=256 * KiB, max_entry_bytes=16 * KiB)
    seen: list[int] = []
    store.listeners.append(lambda entry, stored: seen.append(stored.size))
    for i in range(100):
        stored = store.add(entry_of(f"log-{i:03d}-" + "x" * (i * 1000), {"i": i}, "svc"))
        assert stored is not None
        assert len(stored.encoded) <= 16 * KiB
        assert stored.truncated == (i >= 17)
        assert store.bytes <= 256 * KiB
    entries = store.entries()
    assert entries[-1]["body"].startswith("log-099-")
    assert not any(entry["body"].startswith("log-000-") for entry in entries)
    assert store.bytes == sum(seen[-len(entries) :])
    # Queries filter on the stored fields; the store holds what it counts.
    (newest,) = [s for s in store.query(severity_text="info") if s.entry()["attributes"]["i"] == 99]
    assert newest.truncated and newest.entry()["attributes"][NOTE_KEY]
    store.clear()
    assert len(store) == 0 and store.bytes == 0


def otel_span(
    name: str, attributes: dict[str, Any], events: int = 0, resource_size: int = 10
) -> ReadableSpan:
    context = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(
        name=name,
        context=context,
        resource=Resource({"service.name": "svc", "r": "r" * resource_size}),
        attributes=attributes,
        events=[Event(f"e{i}", {"x": "e" * 2000}, 1) for i in range(events)],
        start_time=1,
        end_time=2,
    )


@settings(max_examples=100, deadline=None)
@given(
    name=text,
    attributes=st.dictionaries(
        st.text(max_size=50), text | st.integers(-(2**40), 2**40), max_size=8
    ),
    events=st.integers(0, 30),
    resource_size=st.integers(0, 20_000),
    limit=st.integers(min_value=4 * KiB, max_value=32 * KiB),
)
def test_fit_span_is_within_its_limit(
    name: str, attributes: dict[str, Any], events: int, resource_size: int, limit: int
) -> None:
    span = otel_span(name, attributes, events, resource_size)
    fitted, size = fit_span(span, limit)
    assert size == span_bytes(fitted) <= limit
    if span_bytes(span) <= limit:
        assert fitted is span
    else:
        assert NOTE_KEY in (fitted.attributes or {})
        assert span.name.startswith(fitted.name.rsplit("… (", 1)[0])
        assert fitted.context == span.context and fitted.end_time == span.end_time


def test_span_bytes_is_at_least_the_span_json_for_ascii_text() -> None:
    span = otel_span("call x", {"function_id": "x" * 5000, "n": 3}, events=3)
    assert len(orjson.dumps(span_to_json(span))) <= span_bytes(span)


def test_span_store_stays_within_its_bytes_and_keeps_the_newest() -> None:
    store = SpanStore(1000, max_bytes=256 * KiB, max_span_bytes=16 * KiB)
    for i in range(60):
        store.add(otel_span(f"span-{i:02d}", {"blob": "b" * (i * 1000)}, events=i % 3))
        assert store.bytes <= 256 * KiB
    names = [stored.span.name for stored in store.spans]
    assert names[-1] == "span-59" and "span-00" not in names
    assert all(span_bytes(stored.span) <= 16 * KiB for stored in store.spans)


def test_sdk_metric_store_stays_within_its_bytes() -> None:
    store = SdkMetricStore(10_000, 3600, max_bytes=64 * KiB)
    now = time.time_ns()
    payload = {
        "resourceMetrics": [
            {
                "scopeMetrics": [
                    {
                        "metrics": [
                            {
                                "name": "m" * 10_000,
                                "gauge": {
                                    "dataPoints": [
                                        {
                                            "asInt": str(i),
                                            "timeUnixNano": str(now),
                                            "attributes": [
                                                {"key": "a", "value": {"stringValue": "v" * i * 50}}
                                            ],
                                        }
                                        for i in range(200)
                                    ]
                                },
                            }
                        ]
                    }
                ]
            }
        ]
    }
    assert store.ingest(payload, "w1") == 200
    assert store.bytes <= 64 * KiB
    points = store.query(start_ms=None, end_ms=None, name=None)
    assert points[-1]["value"] == 199 and all(
        len(orjson.dumps(point)) <= MAX_POINT_BYTES for point in points
    )


def test_engine_metrics_tell_apart_at_most_max_series_functions() -> None:
    metrics = EngineMetrics()
    for i in range(MAX_SERIES + 100):
        metrics.record_invocation(f"nope::{i}::" + "f" * 5000, 0.001, f"code-{i}" + "c" * 5000)
    assert len(metrics.by_function) == MAX_SERIES + 1
    assert metrics.by_function[OTHER].total == 100
    assert len(metrics.by_error_code) <= MAX_SERIES + 1
    assert all(len(function_id) < 300 for function_id in metrics.by_function)
    assert sum(stats.total for stats in metrics.by_function.values()) == metrics.total
    # A function already counted apart stays apart.
    metrics.record_invocation(next(iter(metrics.by_function)), 0.001, None)
    assert metrics.by_function[OTHER].total == 100


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "key", "reason"),
    [
        ({"logs_max_bytes": 100}, "logs_max_bytes", "at least 4096"),
        ({"logs_max_entry_bytes": 32 * MiB}, "logs_max_entry_bytes", "must not exceed"),
        ({"span_max_bytes": True}, "span_max_bytes", "expected an integer"),
        ({"memory_max_bytes": 8192}, "span_max_bytes", "must not exceed memory_max_bytes"),
        ({"metrics_max_bytes": "16MiB"}, "metrics_max_bytes", "expected an integer"),
    ],
)
def test_byte_bounds_are_validated(keys: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"modules": [{"class": OTEL, "config": keys}]}, file="config.yaml")
    assert str(info.value).startswith(f"config.yaml: modules[0].config.{key}: ")
    assert reason in str(info.value)


def test_byte_bound_defaults() -> None:
    config = parse_config({"modules": [{"class": OTEL, "config": {}}]}).module_config(OTEL)
    assert (config.logs_max_bytes, config.logs_max_entry_bytes) == (16 * MiB, 64 * KiB)
    assert (config.memory_max_bytes, config.span_max_bytes) == (16 * MiB, 64 * KiB)
    assert config.metrics_max_bytes == 16 * MiB


# -- through the engine ------------------------------------------------------------------------


def otel_config(**keys: Any) -> Any:
    config = {"enabled": True, "exporter": "memory", "prometheus_enabled": False, **keys}
    return make_config(modules=[{"class": OTEL, "config": config}])


async def test_engine_log_answers_whether_the_log_was_cut() -> None:
    async with open_test_engine(otel_config(logs_max_entry_bytes=8 * KiB)) as engine:
        async with connect_test_worker(engine) as worker:
            small = await worker.call("engine::log::info", {"message": "fine"})
            assert "error" not in small and small.get("result") is None
            big = await worker.call(
                "engine::log::error", {"message": "m" * 100_000, "data": {"k": "v" * 100_000}}
            )
            result = big["result"]
            assert result["truncated"] is True and result["max_entry_bytes"] == 8 * KiB
            assert result["entry_bytes"] > 200_000
            listed = await worker.call("engine::logs::list", {"severity_text": "error"})
            (entry,) = listed["result"]["logs"]
            assert len(orjson.dumps(entry)) <= 8 * KiB
            assert entry["body"].startswith("mmm") and entry["body"].endswith("more chars)")
            assert entry["attributes"]["k"].startswith("vvv")
            assert str(result["entry_bytes"]) in entry["attributes"][NOTE_KEY]


async def test_log_trigger_queue_holds_at_most_logs_max_bytes() -> None:
    config = otel_config(logs_max_bytes=64 * KiB, logs_max_entry_bytes=16 * KiB)
    async with open_test_engine(config) as engine:
        module = engine.modules["observability"]
        async with connect_test_worker(engine) as worker, connect_test_worker(engine) as slow:
            # A log trigger whose function never answers: deliveries pile up.
            await slow.send({"type": "registerfunction", "id": "slow::on_log"})
            await slow.send(
                {
                    "type": "registertrigger",
                    "id": "t1",
                    "trigger_type": "log",
                    "function_id": "slow::on_log",
                    "config": {"level": "info"},
                }
            )
            await slow.call("engine::functions::list", {})
            for i in range(40):
                await worker.call("engine::log::info", {"message": f"{i}-" + "x" * 20_000})
                assert module.logs_queued_bytes <= 64 * KiB
            assert module.logs_dropped > 0 and module.logs_queued_bytes > 0
