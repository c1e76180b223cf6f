"""Hypothesis strategies for wire values and messages."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st

from iii import protocol

__all__ = ["json_values", "messages", "message_of", "uuids", "ids"]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
uuids = st.uuids().map(str)
ids = st.sampled_from(["a::f", "b::g", "engine::functions::list", "x", ""]) | st.text(
    min_size=1, max_size=12
)
error_bodies = st.builds(
    protocol.ErrorBody,
    code=st.text(max_size=12),
    message=st.text(max_size=30),
    stacktrace=st.none() | st.text(max_size=30),
)


def _field_strategy(cls: type, field: attrs.Attribute) -> st.SearchStrategy[Any]:
    name = field.name
    if name == "invocation_id":
        return uuids if cls is protocol.InvocationResult else st.none() | uuids
    if name == "error":
        return st.none() | error_bodies
    attrs.resolve_types(cls)
    if field.type is str:
        return st.text(max_size=16)
    if field.type == (str | None):
        return st.none() | st.text(max_size=16)
    return json_values


def message_of(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{f.name: _field_strategy(cls, f) for f in attrs.fields(cls)})


messages = st.one_of([message_of(cls) for cls in protocol.MESSAGE_TYPES.values()])
