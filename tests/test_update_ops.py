"""Update ops: the documented semantics, one example each (iii/update_ops.py)."""

from __future__ import annotations

import orjson
import pytest

from iii import json_limits
from iii.errors import DeserializationError
from iii.json_limits import MAX_VALUE_DEPTH
from iii.update_ops import MISSING, apply_ops, parse_ops


def run(old, *ops):
    value, errors = apply_ops(old, parse_ops(list(ops)))
    return value, [e.code for e in errors]


def test_missing_key_starts_as_empty_object():
    assert run(MISSING) == ({}, [])
    assert run(MISSING, {"type": "set", "path": "a", "value": 1}) == ({"a": 1}, [])


def test_set_root_replaces_and_null_is_kept():
    assert run({"a": 1}, {"type": "set", "path": "", "value": [1]}) == ([1], [])
    assert run({"a": 1}, {"type": "set", "path": "b", "value": None}) == ({"a": 1, "b": None}, [])


def test_floats_are_numbers():
    assert run({"n": 1.5}, {"type": "increment", "path": "n", "by": 2}) == ({"n": 3.5}, [])
    assert run({"n": 1}, {"type": "increment", "path": "n", "by": 0.5}) == ({"n": 1.5}, [])
    assert run({"n": 2.5}, {"type": "decrement", "path": "n", "by": 1}) == ({"n": 1.5}, [])


def test_decrement_does_not_zero_a_non_number():
    assert run({"n": "x"}, {"type": "decrement", "path": "n", "by": 1}) == (
        {"n": "x"},
        ["decrement.not_number"],
    )
    assert run({"n": True}, {"type": "increment", "path": "n", "by": 1}) == (
        {"n": True},
        ["increment.not_number"],
    )
    assert run({}, {"type": "decrement", "path": "n", "by": 3}) == ({"n": -3}, [])


def test_root_arithmetic_on_missing_starts_from_zero():
    assert run(MISSING, {"type": "increment", "path": "", "by": 4}) == (4, [])
    assert run(7, {"type": "decrement", "path": "", "by": 2}) == (5, [])


def test_nested_paths_create_objects_and_refuse_non_objects():
    value, errors = run({}, {"type": "set", "path": ["a", "b", "c"], "value": 1})
    assert value == {"a": {"b": {"c": 1}}} and errors == []
    value, errors = run({"a": 5}, {"type": "increment", "path": ["a", "b"], "by": 1})
    assert value == {"a": 5} and errors == ["increment.target_not_object"]
    assert run({"a.b": 1}, {"type": "increment", "path": "a.b", "by": 1}) == ({"a.b": 2}, [])


def test_merge_root_and_nested():
    assert run({"a": 1}, {"type": "merge", "value": {"b": 2}}) == ({"a": 1, "b": 2}, [])
    assert run({"u": {"x": 1}}, {"type": "merge", "path": ["u"], "value": {"y": 2}}) == (
        {"u": {"x": 1, "y": 2}},
        [],
    )
    assert run({"a": 1}, {"type": "merge", "path": "", "value": 3}) == (
        {"a": 1},
        ["merge.value.not_an_object"],
    )
    assert run([1], {"type": "merge", "value": {"a": 1}}) == ([1], ["merge.target_not_object"])


def test_append():
    assert run({}, {"type": "append", "path": "l", "value": 1}) == ({"l": [1]}, [])
    assert run({}, {"type": "append", "path": "s", "value": "ab"}) == ({"s": "ab"}, [])
    assert run({"s": "ab"}, {"type": "append", "path": "s", "value": "c"}) == ({"s": "abc"}, [])
    assert run({"l": [1]}, {"type": "append", "path": ["l"], "value": [2]}) == ({"l": [1, [2]]}, [])
    assert run({"s": "ab"}, {"type": "append", "path": "s", "value": 1}) == (
        {"s": "ab"},
        ["append.type_mismatch"],
    )
    assert run(MISSING, {"type": "append", "value": "x"}) == ("x", [])


def test_remove():
    assert run({"a": 1, "b": 2}, {"type": "remove", "path": "a"}) == ({"b": 2}, [])
    assert run({"a": 1}, {"type": "remove", "path": "zz"}) == ({"a": 1}, [])
    assert run({"a": 1}, {"type": "remove", "path": ""}) == (None, [])


def test_failed_op_is_skipped_others_apply():
    value, errors = run(
        {"n": "x"},
        {"type": "increment", "path": "n", "by": 1},
        {"type": "set", "path": "ok", "value": True},
    )
    assert value == {"n": "x", "ok": True} and errors == ["increment.not_number"]


def test_old_value_and_op_values_are_not_aliased():
    old = {"a": {"b": 1}}
    ops = parse_ops(
        [{"type": "set", "path": "c", "value": {}}, {"type": "set", "path": ["c", "d"], "value": 1}]
    )
    first, _ = apply_ops(old, ops)
    second, _ = apply_ops(old, ops)
    assert old == {"a": {"b": 1}}
    assert first == second == {"a": {"b": 1}, "c": {"d": 1}}
    assert ops[0].value == {}


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        [{"type": "explode", "path": "a"}],
        [{"type": "set", "value": 1}],
        [{"type": "increment", "path": "a", "by": "1"}],
        [{"type": "increment", "path": "a", "by": True}],
        [{"type": "merge"}],
        [{"type": "set", "path": ["a", ""], "value": 1}],
        [{"type": "set", "path": 3, "value": 1}],
    ],
)
def test_malformed_ops_are_refused_whole(bad):
    with pytest.raises(DeserializationError):
        parse_ops(bad, "state::update")


# -- issue 10 rows 2 and 12: a result the engine could not store or send is an op error ---------


def test_float_overflow_is_an_error_that_leaves_the_value():
    value, errors = run({"n": 1.7e308}, {"type": "increment", "path": "n", "by": 1.7e308})
    assert value == {"n": 1.7e308} and errors == ["increment.overflow"]
    value, errors = run(-1.7e308, {"type": "decrement", "path": "", "by": 1.7e308})
    assert value == -1.7e308 and errors == ["decrement.overflow"]
    # the other ops still apply, as for any failed op
    value, errors = run(
        {"n": 1.7e308},
        {"type": "increment", "path": "n", "by": 1e308},
        {"type": "increment", "path": "m", "by": 1},
    )
    assert value == {"n": 1.7e308, "m": 1} and errors == ["increment.overflow"]


def test_integers_stay_within_64_bits():
    top = json_limits.INT_MAX
    value, errors = run({"n": 2**62}, *[{"type": "increment", "path": "n", "by": 2**62}] * 4)
    assert value == {"n": 2**64 - 2**62} and errors == ["increment.overflow"] * 2
    assert run({"n": top - 1}, {"type": "increment", "path": "n", "by": 1}) == ({"n": top}, [])
    assert run({}, {"type": "decrement", "path": "n", "by": top}) == ({}, ["decrement.overflow"])
    bottom = json_limits.INT_MIN
    assert run({"n": bottom}, {"type": "decrement", "path": "n", "by": 1}) == (
        {"n": bottom},
        ["decrement.overflow"],
    )


def test_every_result_can_be_encoded():
    value, _ = run(
        {"n": 1.7e308, "i": json_limits.INT_MAX},
        {"type": "increment", "path": "n", "by": 1.7e308},
        {"type": "increment", "path": "i", "by": 1},
        {"type": "decrement", "path": "j", "by": json_limits.INT_MAX},
    )
    assert orjson.loads(orjson.dumps(value)) == value


def deep(levels: int) -> object:
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value


def test_an_op_that_would_nest_too_deep_is_an_error_that_leaves_the_value():
    path = [f"p{i}" for i in range(32)]
    top = MAX_VALUE_DEPTH  # what a worker can send back in a set
    for op, nesting in [
        ({"type": "set", "path": path, "value": deep(top - 32)}, top),
        ({"type": "set", "path": path, "value": deep(top - 31)}, None),
        ({"type": "append", "path": path, "value": deep(top - 33)}, top),
        ({"type": "append", "path": path, "value": deep(top - 32)}, None),
        ({"type": "merge", "path": path, "value": {"x": deep(top - 33)}}, top),
        ({"type": "merge", "path": path, "value": {"x": deep(top - 32)}}, None),
        ({"type": "set", "path": "", "value": deep(top)}, top),
        ({"type": "append", "path": "l", "value": deep(top - 2)}, top),
        ({"type": "append", "path": "l", "value": deep(top - 1)}, None),
    ]:
        value, errors = run({"keep": 1}, op)
        if nesting is None:
            assert value == {"keep": 1} and errors == [f"{op['type']}.too_deep"], op["type"]
        else:
            assert errors == [] and not json_limits.depth_exceeds(value, top), op["type"]
            assert json_limits.depth_exceeds(value, nesting - 1), op["type"]


def test_appending_again_and_again_stays_within_the_bound():
    append = {"type": "append", "path": "", "value": deep(MAX_VALUE_DEPTH - 1)}
    value, errors = run(MISSING, append, append, append)
    assert errors == [] and len(value) == 3
    value, errors = run(value, {"type": "append", "path": "", "value": deep(MAX_VALUE_DEPTH)})
    assert len(value) == 3 and errors == ["append.too_deep"]
