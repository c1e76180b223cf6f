"""What engine-side functions are made of: the call context, the handler type,
and input parsing with upstream's error shape.

An engine function (``engine::…``, ``state::set``, ``enqueue`` …) is an async
callable ``handler(data, ctx) -> result``.  It returns the result (``None``
means "no result": the ``invocationresult`` then has no ``result`` field) or
raises an :class:`~iii.errors.IIIError`.

:func:`parse_input` turns the raw JSON into an attrs input class, ignoring
unknown keys (``_caller_worker_id`` included) and raising
``deserialization_error`` with upstream's message
(``Failed to deserialize input for <id>: …``) on a mismatch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import cattrs

from iii.errors import DeserializationError
from iii.grants import Grant

__all__ = ["CallContext", "NativeHandler", "parse_input", "INPUT_CONVERTER"]

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class CallContext:
    """Who is calling, and the tracing context of the call."""

    function_id: str
    caller_worker_id: str | None = None
    invocation_id: str | None = None
    traceparent: str | None = None
    baggage: str | None = None
    metadata: Any = None
    # The largest frame the answer may take, in bytes, when it goes back to a
    # worker (a 0.4.1 SDK takes 1 MiB); None when the result goes elsewhere.
    # A write whose answer could not be sent is refused before it is applied.
    reply_limit: int | None = None
    # The token the call is made for (None: the engine's own call).  An
    # engine function that calls another function for its caller passes it
    # on (``engine.invoke(..., grant=ctx.grant)``), and checks any function
    # id it takes from its input with ``ctx.grant.require_invoke``.
    grant: Grant | None = None


NativeHandler = Callable[[Any, CallContext], Awaitable[Any]]


def _make_input_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=False)

    def strict_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value

    def strict_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        return value

    def strict_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected a boolean, got {type(value).__name__}")
        return value

    def number(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return value

    converter.register_structure_hook(str, strict_str)
    converter.register_structure_hook(int, strict_int)
    converter.register_structure_hook(bool, strict_bool)
    converter.register_structure_hook(float, number)
    converter.register_structure_hook(Any, lambda v, _: v)
    return converter


INPUT_CONVERTER = _make_input_converter()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(
            cattrs.transform_error(
                exc,
                format_exception=lambda e, t: (
                    "missing field" if isinstance(e, KeyError) else (str(e) or type(e).__name__)
                ),
            )
        )
    return str(exc)


def parse_input(data: Any, cls: type[T], function_id: str) -> T:
    """Structure ``data`` into ``cls`` or raise ``deserialization_error``."""
    if data is None or not isinstance(data, dict):
        raise DeserializationError(
            f"Failed to deserialize input for {function_id}: expected an object, "
            f"got {'null' if data is None else type(data).__name__}"
        )
    try:
        return INPUT_CONVERTER.structure(data, cls)
    except Exception as exc:
        raise DeserializationError(
            f"Failed to deserialize input for {function_id}: {_describe(exc)}"
        ) from None
