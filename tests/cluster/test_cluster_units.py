"""The cluster's pure parts: member records and catalogs from peers (peer data), the catalog's guard."""

from __future__ import annotations

import orjson
import pytest

from iii.cluster.catalog import read_catalog
from iii.cluster.membership import MAX_RECORD_BYTES, MemberInfo
from iii.config import parse_config
from iii.errors import ConfigError
from iii.testing import connect_test_worker
from tests.cluster.helpers import open_cluster


def test_member_records_from_redis_are_validated() -> None:
    good = MemberInfo(id="e1", advertise="ws://h:1", host="h", pid=3, started_ms=4)
    assert MemberInfo.from_json(good.to_json()) == good
    for bad in (
        b"not json",
        b"[]",
        orjson.dumps({"id": "e1"}),
        orjson.dumps({"id": "e1", "advertise": "http://h:1"}),
        orjson.dumps({"id": "", "advertise": "ws://h:1"}),
        orjson.dumps({"id": "e1", "advertise": "ws://h:1", "pid": "3"}),
        orjson.dumps({"id": "e1", "advertise": "ws://h:1", "host": "x" * MAX_RECORD_BYTES}),
    ):
        assert MemberInfo.from_json(bad) is None, bad


def test_a_peer_catalog_keeps_only_well_formed_entries() -> None:
    raw = {
        "engine": "e2",
        "version": 3,
        "functions": [
            {"function_id": "ok::f", "description": "d", "metadata": {"a": 1}},
            {"function_id": "engine::functions::list"},  # never mirrored
            {"function_id": 5},
            "garbage",
        ],
        "http": [
            {
                "id": "t1",
                "trigger_type": "http",
                "function_id": "ok::f",
                "config": {"api_path": "/x"},
            },
            {
                "id": "t2",
                "trigger_type": "state",
                "function_id": "ok::f",
                "config": {},
            },  # not mirrored
            {"id": "t3", "function_id": "ok::f", "config": "x"},
        ],
        "workers": [{"id": "w1"}, {"no": "id"}],
        "triggers": [
            {"id": "t1", "trigger_type": "http", "function_id": "ok::f", "config": {}},
            {"id": 1},
        ],
    }
    catalog = read_catalog(raw, expected_engine="e2")
    assert catalog is not None
    assert list(catalog.functions) == ["ok::f"]
    assert list(catalog.http) == ["t1"]
    assert [w["id"] for w in catalog.workers] == ["w1"]
    assert len(catalog.triggers) == 1
    assert read_catalog({**raw, "engine": "someone-else"}, expected_engine="e2") is None
    assert read_catalog({**raw, "version": "3"}, expected_engine="e2") is None
    assert read_catalog([], expected_engine="e2") is None


def test_cluster_config_errors_name_the_key() -> None:
    env = {"TOK": "t" * 20}
    base = {"name": "c", "redis_url": "redis://127.0.0.1:6379", "token_env": "TOK"}
    cases = {
        "cluster.token_env": {**base, "token_env": "MISSING"},
        "cluster.dead_after_ms": {**base, "dead_after_ms": 10},
        "cluster.advertise": {**base, "advertise": "127.0.0.1:1"},
        "cluster": {**base, "peers": []},
    }
    for key, cluster in cases.items():
        try:
            parse_config({"cluster": cluster}, file="c.yaml", env=env)
        except ConfigError as exc:
            assert exc.key == key and exc.file == "c.yaml", (key, exc)
        else:
            raise AssertionError(f"{key}: no error")
    config = parse_config({"cluster": base}, env=env)
    assert config.cluster is not None and config.cluster.dead_after_ms <= 5000


@pytest.mark.services  # two engines meet through Redis
async def test_only_peers_may_read_the_catalog() -> None:
    async with open_cluster(2) as (a, _):
        async with connect_test_worker(a) as worker:
            answer = await worker.call("engine::cluster::catalog", {})
            assert answer["error"]["code"] == "forbidden"
            status = await worker.call("engine::cluster::status", {})
            assert len(status["result"]["peers"]) == 1
