"""JSON bounds (iii.json_limits): depth at every entry, and nothing unencodable goes out.

Issue 10 rows 2 and 3: what the engine accepts it can always encode again,
and a value it cannot encode fails one call with an error answer, never a task.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from iii import json_limits
from iii.errors import IIIError, MessageDecodeError
from iii.json_limits import MAX_DEPTH, JsonTooDeepError, check_depth, check_number, loads
from iii.protocol import decode_message
from iii.testing import connect_test_worker, make_config, open_test_engine


def chain(kinds: list[str], leaf: Any = 0) -> Any:
    """Containers nested in the order given (outermost first), with siblings."""
    value = leaf
    for kind in reversed(kinds):
        value = [1, value, "x"] if kind == "list" else {"a": 1, "b": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_depth_counts_levels_of_arrays_and_objects(kind):
    assert loads(json.dumps(chain([kind] * MAX_DEPTH))) == chain([kind] * MAX_DEPTH)
    with pytest.raises(JsonTooDeepError, match=f"nested deeper than {MAX_DEPTH} levels"):
        loads(json.dumps(chain([kind] * (MAX_DEPTH + 1))))
    with pytest.raises(JsonTooDeepError):
        loads(("[" * 1000 + "]" * 1000).encode())
    assert loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)  # the shortest documents at the limit
    with pytest.raises(JsonTooDeepError):
        loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(JsonTooDeepError):  # deeper than orjson reads at all
        loads("[" * 5000 + "]" * 5000)
    assert loads("0") == 0 and loads(b"[]") == [] and loads(memoryview(b"{}")) == {}


def test_brackets_inside_strings_are_not_levels():
    text = json.dumps({"s": "[{" * 5000, "l": [["]]]]"]]})
    assert loads(text)["s"] == "[{" * 5000


def test_too_deep_is_a_decode_error_that_keeps_the_document():
    with pytest.raises(orjson.JSONDecodeError) as caught:
        loads(json.dumps({"id": "x", "data": chain(["list"] * 300)}))
    assert isinstance(caught.value, JsonTooDeepError)
    assert str(caught.value) == f"nested deeper than {MAX_DEPTH} levels"
    assert caught.value.document["id"] == "x"


@settings(max_examples=200, deadline=None)
@given(kinds=st.lists(st.sampled_from(["list", "dict"]), max_size=2 * MAX_DEPTH))
def test_what_loads_accepts_orjson_can_write_inside_a_hundred_more_levels(kinds):
    text = json.dumps(chain(kinds))
    if len(kinds) > MAX_DEPTH:
        with pytest.raises(JsonTooDeepError):
            loads(text)
        return
    value = loads(text)
    envelope: Any = value
    for _ in range(100):
        envelope = {"wrapped": envelope}
    assert orjson.loads(orjson.dumps(envelope)) == envelope


def test_check_depth_on_values_the_engine_builds():
    check_depth(chain(["dict"] * MAX_DEPTH, leaf=2**70))  # unencodable, but not too deep
    with pytest.raises(JsonTooDeepError):
        check_depth(chain(["dict"] * (MAX_DEPTH + 1), leaf=2**70))
    with pytest.raises(JsonTooDeepError):
        check_depth(chain(["list"] * 40), limit=39)
    check_depth(chain(["list"] * 39), limit=39)


def test_check_number():
    assert check_number(json_limits.INT_MAX) and check_number(json_limits.INT_MIN)
    assert not check_number(json_limits.INT_MAX + 1) and not check_number(json_limits.INT_MIN - 1)
    assert check_number(1.7e308) and not check_number(1.7e308 * 2)
    assert not check_number(float("nan")) and not check_number(float("-inf"))


def test_a_frame_nested_too_deep_is_a_decode_error_naming_the_call():
    frame = json.dumps(
        {
            "type": "invokefunction",
            "function_id": "f",
            "invocation_id": "8DD4B577-2860-45CC-ACFF-17FB868EC5AC",
            "data": chain(["list"] * 300),
        }
    )
    with pytest.raises(MessageDecodeError) as caught:
        decode_message(frame)
    assert caught.value.reason == f"nested deeper than {MAX_DEPTH} levels"
    assert caught.value.message_type == "invokefunction"
    assert caught.value.invocation_id == "8dd4b577-2860-45cc-acff-17fb868ec5ac"
    assert caught.value.function_id == "f"


# -- encoding never fails a task: the caller gets an error answer -----------------------------


async def test_an_unencodable_result_is_answered_as_an_error_and_the_caller_stays():
    async with open_test_engine(make_config()) as engine:

        async def bad(data: Any, ctx: Any) -> Any:
            return {"n": 2**70} if data == "big" else chain(["list"] * 300)

        engine.register_function("test::bad", bad)
        async with connect_test_worker(engine) as worker:
            for data in ("big", "deep"):
                reply = await worker.call("test::bad", data)
                assert reply["error"]["code"] == "serialization_error", reply
            assert "error" not in await worker.call("engine::workers::list", {})


async def test_invoke_refuses_data_it_cannot_send_and_files_nothing():
    async with open_test_engine(make_config()) as engine:
        async with connect_test_worker(engine) as worker:
            await worker.send({"type": "registerfunction", "id": "w::f"})
            await worker.call("engine::workers::list", {})
            for data in ({"n": 2**64}, chain(["list"] * 300)):
                with pytest.raises(IIIError) as caught:
                    await engine.invoke("w::f", data)
                assert caught.value.code == "serialization_error"
            assert len(engine.pending) == 0
            # Nothing was sent: the first call the worker sees is the next good one.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.invoke, "w::f", {"ok": 1})
                message = await worker.receive_type("invokefunction")
                assert message["data"] == {"ok": 1}
                answer = {"type": "invocationresult", "function_id": "w::f"}
                await worker.send({**answer, "invocation_id": message["invocation_id"]})
