"""The embedded store refuses what it cannot keep, before it changes anything (issue 10 row 4).

A hypothesis property over random writes (set, update, delete, batch), many
of them too large for the value limit, for the caller's answer or for one
record of the log (made small here through ``max_record``): after the
store is closed and opened again, every acknowledged write is there, every
refused one is not, and the log reads back whole.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio

from iii.adapters.filelog import MAX_RECORD, RecordLog, RecordTooLargeError, open_record_log
from iii.adapters.kvstore import KvStoreConfig, open_kv_store
from iii.adapters.limits import AnswerTooLargeError, ValueTooLargeError, WriteLimits
from iii.update_ops import MISSING, apply_ops, parse_ops

MAX_RECORD_TEST = 3000
INDEXES = ("i", "j")
KEYS = ("a", "b")


def file_config(directory: Path) -> KvStoreConfig:
    return KvStoreConfig(store_method="file_based", file_path=str(directory))


# -- the record log itself ------------------------------------------------------------------


async def test_the_log_refuses_a_record_it_could_not_read_back(tmp_path):
    path = tmp_path / "x.log"
    record_log, _, _ = await open_record_log(path, max_record=100)
    await record_log.append(["small"])
    with pytest.raises(RecordTooLargeError):
        await record_log.append(["x" * 200])
    with pytest.raises(RecordTooLargeError):  # a batch is refused whole
        await record_log.append_many([["ok"], ["y" * 200]])
    await record_log.append(["after"])
    await record_log.aclose()
    # Opened with the full limit, as a later engine would: every record is there.
    record_log, records, recovery = await open_record_log(path)
    assert records == [["small"], ["after"]] and not recovery.damaged
    await record_log.aclose()
    with pytest.raises(ValueError):
        RecordLog(path=path, max_record=MAX_RECORD + 1)


async def test_a_failed_compaction_keeps_the_old_log_and_what_was_queued(tmp_path):
    path = tmp_path / "x.log"
    record_log, _, _ = await open_record_log(path, max_record=100)
    await record_log.append(["first"])
    with pytest.raises(RecordTooLargeError):
        await record_log.rewrite(iter([["kept"], ["z" * 200]]))
    await record_log.append(["second"])
    await record_log.aclose()
    _, records, _ = await open_record_log(path)
    assert records == [["first"], ["second"]]


# -- the store: refused writes change nothing, acknowledged ones survive ------------------

small_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("xyz"), inner, max_size=3)
    ),
    max_leaves=5,
)
# Strings around the limits (the record limit is 3000 bytes, value limits
# are drawn below it and above it).
big_values = st.integers(500, 3500).map(lambda n: "v" * n)
values = st.one_of(small_values, big_values, big_values)
places = st.tuples(st.sampled_from(INDEXES), st.sampled_from(KEYS))
ops_lists = st.lists(
    st.one_of(
        st.builds(
            lambda v: {"type": "append", "value": v}, st.integers(300, 1500).map(lambda n: "w" * n)
        ),
        st.builds(lambda v: {"type": "set", "path": "f", "value": v}, values),
        st.builds(
            lambda b: {"type": "increment", "path": "n", "by": b},
            st.sampled_from([1, 1.7e308, 2**63]),
        ),
        st.just({"type": "remove", "path": "f"}),
    ),
    min_size=1,
    max_size=3,
)
limits = st.builds(
    WriteLimits,
    max_value_bytes=st.none() | st.integers(1000, 4000),
    max_answer_bytes=st.none() | st.integers(1000, 4000) | st.integers(4000, 8000),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("set"), places, values, limits),
        st.tuples(st.just("update"), places, ops_lists, limits),
        st.tuples(st.just("delete"), places, st.none(), limits),
        st.tuples(
            st.just("batch"),
            st.lists(
                st.one_of(
                    st.tuples(st.just("set"), places, values),
                    st.tuples(st.just("delete"), places, st.none()),
                ),
                min_size=1,
                max_size=3,
            ),
            st.none(),
            st.none(),
        ),
        st.tuples(st.just("compact"), st.none(), st.none(), st.none()),
    ),
    min_size=5,
    max_size=20,
)

REFUSED = (ValueTooLargeError, AnswerTooLargeError, RecordTooLargeError)


async def _contents(store: Any) -> dict[str, dict[str, Any]]:
    return {index: dict(await store.items(index)) for index in await store.list_indexes()}


async def _run(sequence: list[Any], directory: Path) -> None:
    model: dict[str, dict[str, Any]] = {}
    outcomes = []
    async with open_kv_store(file_config(directory), max_record=MAX_RECORD_TEST) as store:
        for kind, place, argument, write_limits in sequence:
            before = copy.deepcopy(model)
            try:
                if kind == "set":
                    index, key = place
                    await store.set(index, key, argument, write_limits)
                    model.setdefault(index, {})[key] = argument
                elif kind == "update":
                    index, key = place
                    ops = parse_ops(argument)
                    result = await store.update(index, key, ops, write_limits)
                    expected, errors = apply_ops(model.get(index, {}).get(key, MISSING), ops)
                    assert (result.new_value, result.errors) == (expected, errors)
                    model.setdefault(index, {})[key] = result.new_value
                elif kind == "delete":
                    index, key = place
                    await store.delete(index, key, write_limits)
                    model.get(index, {}).pop(key, None)
                elif kind == "batch":
                    await store.write_batch([(m[0], *m[1], m[2]) for m in place])
                    for mutation, (index, key), value in place:
                        if mutation == "set":
                            model.setdefault(index, {})[key] = value
                        else:
                            model.get(index, {}).pop(key, None)
                else:
                    await store.compact()
                outcomes.append("ok")
            except REFUSED as exc:
                hypothesis.event(f"{kind} refused: {type(exc).__name__}")
                outcomes.append("refused")
                model = before
            model = {index: keys for index, keys in model.items() if keys}
            assert await _contents(store) == model  # a refused write changed nothing
        assert store.recovery is not None and not store.recovery.damaged
    # Reopened as a later engine would, with the full record limit.
    async with open_kv_store(file_config(directory)) as store:
        assert store.recovery is not None and not store.recovery.damaged, store.recovery
        assert await _contents(store) == model, outcomes


@hypothesis.settings(
    max_examples=150, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(sequence=steps)
def test_acknowledged_writes_survive_and_refused_ones_leave_no_trace(sequence):
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(_run, sequence, Path(tmp) / "kv")


async def test_the_attack_scaled_down(tmp_path):
    """Row 4 as reported: root appends past the record limit, then small writes."""
    async with open_kv_store(file_config(tmp_path / "kv"), max_record=MAX_RECORD_TEST) as store:
        chunk = {"type": "append", "value": "x" * 1000}
        refused = 0
        for _ in range(5):
            try:
                await store.update("s", "big", parse_ops([chunk]))
            except RecordTooLargeError:
                refused += 1
        assert refused == 3  # the third append would make a record over 3000 bytes
        for n in range(100):
            await store.set("s", f"k{n}", n)
    async with open_kv_store(file_config(tmp_path / "kv")) as store:
        assert store.recovery is not None and not store.recovery.damaged
        assert [await store.get("s", f"k{n}") for n in range(100)] == list(range(100))
        assert await store.get("s", "big") == "x" * 2000
