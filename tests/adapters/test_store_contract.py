"""The contract every state and stream adapter keeps, run against memory, file and Redis.

Plus a hypothesis property: the same sequence of writes and update ops gives the
same results (old value, new value, op errors) on every backend.
"""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
import trio

from iii.adapters.state import StateAdapterRef, open_state_adapter
from iii.adapters.stream import StreamAdapterRef, open_stream_adapter
from iii.config_schema import CONFIG_CONVERTER
from iii.update_ops import parse_ops
from tests.backends import KIND_PARAMS, KINDS, adapter_block, delete_prefix, new_prefix
from tests.support import require_redis


@asynccontextmanager
async def open_backend(module, kind, tmp_path, prefix=None):
    block = adapter_block(module, kind, Path(tmp_path), prefix=prefix)
    ref_type = StateAdapterRef if module == "state" else StreamAdapterRef
    ref = CONFIG_CONVERTER.structure(block, ref_type)
    opener = open_state_adapter if module == "state" else open_stream_adapter
    try:
        async with opener(ref, on_peer_event=lambda event: None) as adapter:
            yield adapter
    finally:
        if kind == "redis":
            await delete_prefix(block["config"]["key_prefix"])


@pytest.fixture(params=KIND_PARAMS)
async def state(request, tmp_path):
    async with open_backend("state", request.param, tmp_path) as adapter:
        yield adapter


@pytest.fixture(params=KIND_PARAMS)
async def stream(request, tmp_path):
    async with open_backend("stream", request.param, tmp_path) as adapter:
        yield adapter


def ops(*raw):
    return parse_ops(list(raw))


async def test_state_contract(state):
    assert await state.get("s", "k") is None
    assert await state.set("s", "k", {"a": 1}) is None
    assert await state.set("s", "k", {"a": 2}) == {"a": 1}
    assert await state.set("s", "n", None) is None  # null is a value like any other
    assert await state.get("s", "k") == {"a": 2}
    result = await state.update("s", "fresh", ops({"type": "increment", "path": "c", "by": 1}))
    assert (result.old_value, result.new_value, result.errors) == (None, {"c": 1}, ())
    result = await state.update("s", "fresh", ops({"type": "append", "path": "c", "value": 1}))
    assert result.new_value == {"c": 1} and [e.code for e in result.errors] == [
        "append.type_mismatch"
    ]
    assert sorted(map(repr, await state.list("s"))) == sorted(map(repr, [{"a": 2}, None, {"c": 1}]))
    await state.set("t", "x", 1)
    assert await state.list_groups() == ["s", "t"]
    assert await state.delete("t", "x") == 1
    assert await state.delete("t", "x") is None
    assert await state.list_groups() == ["s"]
    assert await state.list("t") == []


async def test_concurrent_updates_are_atomic(state):
    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(
                state.update, "s", "counter", ops({"type": "increment", "path": "n", "by": 1})
            )
    assert await state.get("s", "counter") == {"n": 40}


async def test_stream_contract(stream):
    assert await stream.set("chat", "r1", "m1", {"t": 1}) is None
    assert await stream.set("chat", "r1", "m1", {"t": 2}) == {"t": 1}
    await stream.set("chat", "r:2", "m1", 3)
    await stream.set("chat:x", "g", "m1", 4)
    assert await stream.get("chat", "r1", "m1") == {"t": 2}
    assert await stream.list("chat", "r1") == [{"t": 2}]
    assert await stream.list_groups("chat") == ["r1", "r:2"]
    assert await stream.list_all() == [("chat", ["r1", "r:2"]), ("chat:x", ["g"])]
    result = await stream.update(
        "chat", "r1", "m2", ops({"type": "set", "path": ["a", "b"], "value": 1})
    )
    assert (result.old_value, result.new_value) == (None, {"a": {"b": 1}})
    assert await stream.delete("chat", "r:2", "m1") == 3
    assert await stream.delete("chat", "r:2", "m1") is None
    assert await stream.list_groups("chat") == ["r1"]
    await stream.delete("chat:x", "g", "m1")
    assert await stream.list_all() == [("chat", ["r1"])]


# -- the same ops give the same results everywhere -------------------------------------------

fields = st.sampled_from(["a", "b", "n"])
paths = st.one_of(st.just(""), fields, st.lists(fields, min_size=1, max_size=3))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | st.floats(-1e6, 1e6, allow_nan=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(fields, inner, max_size=3),
    max_leaves=6,
)
numbers = st.integers(-50, 50) | st.floats(-100, 100, allow_nan=False)
op_strategy = st.one_of(
    st.builds(lambda p, v: {"type": "set", "path": p, "value": v}, paths, json_values),
    st.builds(
        lambda p, v: {"type": "merge", "path": p, "value": v},
        paths,
        st.dictionaries(fields, json_values, max_size=2) | json_values,
    ),
    st.builds(lambda p, b: {"type": "increment", "path": p, "by": b}, paths, numbers),
    st.builds(lambda p, b: {"type": "decrement", "path": p, "by": b}, paths, numbers),
    st.builds(lambda p: {"type": "remove", "path": p}, paths),
    st.builds(lambda p, v: {"type": "append", "path": p, "value": v}, paths, json_values),
)
steps = st.lists(
    st.one_of(
        st.builds(lambda o: ("update", o), st.lists(op_strategy, min_size=1, max_size=4)),
        st.builds(lambda v: ("set", v), json_values),
        st.just(("delete", None)),
    ),
    min_size=1,
    max_size=6,
)


async def _run_everywhere(sequence, prefix):
    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as stack:
            adapters = [
                await stack.enter_async_context(open_backend("state", kind, tmp, prefix))
                for kind in KINDS
            ]
            for kind, argument in sequence:
                outcomes = []
                for adapter in adapters:
                    if kind == "update":
                        r = await adapter.update("scope", "key", parse_ops(argument))
                        outcomes.append(
                            (r.old_value, r.new_value, [(e.op_index, e.code) for e in r.errors])
                        )
                    elif kind == "set":
                        outcomes.append(await adapter.set("scope", "key", argument))
                    else:
                        outcomes.append(await adapter.delete("scope", "key"))
                assert all(o == outcomes[0] for o in outcomes), (
                    kind,
                    argument,
                    dict(zip(KINDS, outcomes, strict=True)),
                )
                assert all(repr(o) == repr(outcomes[0]) for o in outcomes), "int/float kinds differ"
            finals = [await adapter.get("scope", "key") for adapter in adapters]
            assert all(repr(f) == repr(finals[0]) for f in finals)


@pytest.mark.services  # compares every backend, Redis included
@hypothesis.settings(
    max_examples=60, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(sequence=steps)
def test_same_ops_same_results_on_every_backend(sequence):
    require_redis()
    trio.run(_run_everywhere, sequence, new_prefix())


async def test_overflow_is_an_op_error_and_changes_nothing(state):
    # issue 10 row 12: the ops run in Python on every backend (Redis: between
    # its read and its compare-and-set), so each refuses the same way.
    await state.set("s", "n", {"f": 1.7e308, "i": 2**63})
    result = await state.update(
        "s",
        "n",
        ops(
            {"type": "increment", "path": "f", "by": 1.7e308},
            {"type": "increment", "path": "i", "by": 2**63},
            {"type": "increment", "path": "j", "by": 1},
        ),
    )
    assert [(e.op_index, e.code) for e in result.errors] == [
        (0, "increment.overflow"),
        (1, "increment.overflow"),
    ]
    assert result.new_value == {"f": 1.7e308, "i": 2**63, "j": 1}
    assert await state.get("s", "n") == {"f": 1.7e308, "i": 2**63, "j": 1}
