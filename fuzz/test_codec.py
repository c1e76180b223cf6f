"""Every message survives a round trip through the wire converter; decoding never crashes."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from fuzz.strategies import json_values, messages
from iii import protocol
from iii.errors import MessageDecodeError


@given(message=messages)
def test_round_trip(message):
    cls = type(message)
    text = protocol.encode_message(message)
    assert orjson.loads(text)["type"] == cls.TYPE
    decoded = protocol.decode_message(text)
    if cls is protocol.InvocationResult and message.result is None:
        assert "result" not in orjson.loads(text)
    assert decoded == message


@given(value=json_values)
def test_decoding_arbitrary_json_never_crashes(value):
    try:
        protocol.decode_message(orjson.dumps(value))
    except MessageDecodeError:
        pass


@given(
    obj=st.dictionaries(
        st.sampled_from(
            [
                "type",
                "function_id",
                "invocation_id",
                "data",
                "id",
                "error",
                "result",
                "config",
                "trigger_type",
            ]
        ),
        json_values | st.sampled_from(list(protocol.MESSAGE_TYPES)),
        max_size=6,
    )
)
def test_decoding_near_messages_never_crashes(obj):
    try:
        message = protocol.decode_message(orjson.dumps(obj))
    except MessageDecodeError as exc:
        assert exc.reason
    else:
        assert type(message).TYPE == obj["type"]


@given(raw=st.binary(max_size=64))
def test_decoding_bytes_never_crashes(raw):
    try:
        protocol.decode_message(raw)
    except MessageDecodeError:
        pass
