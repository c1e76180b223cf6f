"""Every message of the iii worker protocol, and how it goes on and off the wire.

One frozen attrs class per message; its wire tag (the ``type`` field) is the
class name lower-cased.  :data:`CONVERTER` is the single cattrs converter for
the wire; :func:`decode_message` and :func:`encode_message` are the only ways
in and out.

Decoding is deliberately lenient (spec protocol.md §6.4): unknown fields are
ignored, a missing ``data`` / ``config`` reads as null, ``registerservice``
needs no ``name``, and the HEAD additions (``reattach``,
``unregistertriggertype``, ``action``, ``metadata``, ``stacktrace`` ...) are
accepted.  What cannot be decoded raises :class:`MessageDecodeError`, carrying
the ``invocation_id`` when it could still be read.  Its reason quotes at most
a snippet of what the peer sent (:func:`iii.log.bounded_repr`): the reason is
logged and sent back, and a 60 MiB frame must not become a 60 MiB log line.

Encoding leaves out optional fields that are None, as the Rust engine does
(``skip_serializing_if``), writes compact UTF-8 JSON and never ASCII-escapes.

Lifetime: none: constants, value types and pure functions.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, ClassVar, Final, Union

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.v import format_exception

from iii import json_limits
from iii.errors import MessageDecodeError
from iii.log import bounded_repr, truncate

__all__ = [
    "ErrorBody",
    "RegisterFunction",
    "UnregisterFunction",
    "RegisterTriggerType",
    "UnregisterTriggerType",
    "RegisterTrigger",
    "UnregisterTrigger",
    "TriggerRegistrationResult",
    "InvokeFunction",
    "InvocationResult",
    "RegisterService",
    "Ping",
    "Pong",
    "WorkerRegistered",
    "Reattach",
    "RegistrationRejected",
    "Message",
    "MESSAGE_TYPES",
    "CONVERTER",
    "TELEMETRY_PREFIXES",
    "decode_message",
    "encode_message",
    "canonical_uuid",
    "CloseCode",
]

TELEMETRY_PREFIXES: Final = (b"OTLP", b"MTRC", b"LOGS")


class CloseCode:
    """WebSocket close codes the engine uses (RFC 6455 §7.4.1)."""

    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED = 1003
    BAD_PAYLOAD = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # Sent at engine shutdown: not a "clean" code, so the 0.4.1 SDK (which only
    # reconnects on an error close) comes back once the engine is up again.
    SERVICE_RESTART = 1012


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAX_UUID_TEXT = 64


def canonical_uuid(value: Any) -> str:
    """Parse a UUID string and return its canonical lower-case hyphenated form."""
    if not isinstance(value, str):
        raise ValueError(f"expected a UUID string, got {type(value).__name__}")
    # Every spelling uuid.UUID accepts ("urn:uuid:{...}") is far shorter: a
    # longer value is refused before it is copied (lower(), uuid.UUID).
    if len(value) > _MAX_UUID_TEXT:
        raise ValueError(f"not a UUID: {bounded_repr(value, 40)}")
    lowered = value.lower()
    if _CANONICAL_UUID.fullmatch(lowered):  # the common case, ten times cheaper than uuid.UUID
        return lowered
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"not a UUID: {bounded_repr(value, 40)}") from None


@attrs.frozen(kw_only=True)
class ErrorBody:
    code: str
    message: str
    stacktrace: str | None = None


@attrs.frozen(kw_only=True)
class RegisterFunction:
    TYPE: ClassVar[str] = "registerfunction"
    id: str
    description: str | None = None
    request_format: Any = None
    response_format: Any = None
    metadata: Any = None
    # An HTTP-invoked function (spec §2.1).  Kept opaque here: the
    # http_functions module validates it and can then report a readable error.
    invocation: Any = None


@attrs.frozen(kw_only=True)
class UnregisterFunction:
    TYPE: ClassVar[str] = "unregisterfunction"
    id: str


@attrs.frozen(kw_only=True)
class RegisterTriggerType:
    TYPE: ClassVar[str] = "registertriggertype"
    id: str
    description: str = ""
    trigger_request_format: Any = None
    call_request_format: Any = None


@attrs.frozen(kw_only=True)
class UnregisterTriggerType:
    TYPE: ClassVar[str] = "unregistertriggertype"
    id: str


@attrs.frozen(kw_only=True)
class RegisterTrigger:
    TYPE: ClassVar[str] = "registertrigger"
    id: str
    trigger_type: str
    function_id: str
    config: Any = None
    metadata: Any = None


@attrs.frozen(kw_only=True)
class UnregisterTrigger:
    TYPE: ClassVar[str] = "unregistertrigger"
    id: str
    trigger_type: str | None = None


@attrs.frozen(kw_only=True)
class TriggerRegistrationResult:
    TYPE: ClassVar[str] = "triggerregistrationresult"
    id: str
    trigger_type: str
    function_id: str
    error: ErrorBody | None = None


@attrs.frozen(kw_only=True)
class InvokeFunction:
    TYPE: ClassVar[str] = "invokefunction"
    function_id: str
    data: Any = None
    invocation_id: str | None = None
    traceparent: str | None = None
    baggage: str | None = None
    # HEAD additions: {"type":"void"} | {"type":"enqueue","queue":Q}, and a
    # per-call sidecar forwarded to the target as its own field.
    action: Any = None
    metadata: Any = None


@attrs.frozen(kw_only=True)
class InvocationResult:
    TYPE: ClassVar[str] = "invocationresult"
    invocation_id: str
    function_id: str
    result: Any = None
    error: ErrorBody | None = None
    traceparent: str | None = None
    baggage: str | None = None


@attrs.frozen(kw_only=True)
class RegisterService:
    TYPE: ClassVar[str] = "registerservice"
    id: str
    name: str = ""
    description: str | None = None
    parent_service_id: str | None = None


@attrs.frozen(kw_only=True)
class Ping:
    TYPE: ClassVar[str] = "ping"


@attrs.frozen(kw_only=True)
class Pong:
    TYPE: ClassVar[str] = "pong"


@attrs.frozen(kw_only=True)
class WorkerRegistered:
    TYPE: ClassVar[str] = "workerregistered"
    worker_id: str
    reattach_token: str | None = None


@attrs.frozen(kw_only=True)
class Reattach:
    TYPE: ClassVar[str] = "reattach"
    previous_worker_id: str
    reattach_token: str | None = None


@attrs.frozen(kw_only=True)
class RegistrationRejected:
    TYPE: ClassVar[str] = "registrationrejected"
    code: str
    namespace: str = "default"
    function_id: str | None = None
    worker_name: str | None = None
    owner_worker_id: str = ""


Message = Union[
    RegisterFunction,
    UnregisterFunction,
    RegisterTriggerType,
    UnregisterTriggerType,
    RegisterTrigger,
    UnregisterTrigger,
    TriggerRegistrationResult,
    InvokeFunction,
    InvocationResult,
    RegisterService,
    Ping,
    Pong,
    WorkerRegistered,
    Reattach,
    RegistrationRejected,
]

MESSAGE_TYPES: Final[dict[str, type[Any]]] = {
    cls.TYPE: cls
    for cls in (
        RegisterFunction,
        UnregisterFunction,
        RegisterTriggerType,
        UnregisterTriggerType,
        RegisterTrigger,
        UnregisterTrigger,
        TriggerRegistrationResult,
        InvokeFunction,
        InvocationResult,
        RegisterService,
        Ping,
        Pong,
        WorkerRegistered,
        Reattach,
        RegistrationRejected,
    )
}


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(omit_if_default=True, forbid_extra_keys=False)

    def structure_str(value: Any, _: type) -> str:
        # Strict: the Rust engine rejects a number where a string is expected.
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value

    def structure_error_body(value: Any, _: type) -> ErrorBody:
        if not isinstance(value, dict):
            raise TypeError("error must be an object with string code and message")
        code, message, stacktrace = value.get("code"), value.get("message"), value.get("stacktrace")
        if not isinstance(code, str) or not isinstance(message, str):
            raise TypeError("error must be an object with string code and message")
        return ErrorBody(
            code=code,
            message=message,
            stacktrace=stacktrace if isinstance(stacktrace, str) else None,
        )

    converter.register_structure_hook(str, structure_str)
    converter.register_structure_hook(ErrorBody, structure_error_body)
    converter.register_structure_hook(Any, lambda v, _: v)
    # ``Any`` fields (data, result, config, metadata) hold JSON values as they
    # came off the wire or as the engine built them: they go to orjson as
    # they are.  Walking them value by value was the largest single cost of
    # encoding an HTTP request's payload (9 us of 10; bench/bench_rest.py).
    converter.register_unstructure_hook_func(lambda t: t is Any, lambda v: v)

    uuid_override = override(struct_hook=lambda v, _: None if v is None else canonical_uuid(v))
    for cls in (InvokeFunction, InvocationResult):
        converter.register_structure_hook(
            cls, make_dict_structure_fn(cls, converter, invocation_id=uuid_override)
        )
    # `data` always travels on an engine->worker invokefunction, null included:
    # SDK handlers read it unconditionally.
    converter.register_unstructure_hook(
        InvokeFunction,
        make_dict_unstructure_fn(
            InvokeFunction,
            converter,
            _cattrs_omit_if_default=True,
            data=override(omit_if_default=False),
        ),
    )
    return converter


CONVERTER: Final = _make_converter()


def _peek(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if not isinstance(value, str):
        return None
    if key == "invocation_id":
        try:
            return canonical_uuid(value)
        except ValueError:
            return None
    return value


def _format_field_error(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, (ValueError, TypeError)) and str(exc):
        return str(exc)
    return format_exception(exc, type_)


def decode_message(raw: str | bytes) -> Message:
    """Decode one text (or non-telemetry binary) frame into a message.

    Raises :class:`MessageDecodeError` for anything that is not a valid message.
    """
    try:
        obj = json_limits.loads(raw)
    except json_limits.JsonTooDeepError as exc:
        # It was decoded, so the ids can still be read and the caller answered.
        obj = exc.document if isinstance(exc.document, dict) else {}
        type_tag = obj.get("type")
        raise MessageDecodeError(
            exc.reason,
            message_type=type_tag if isinstance(type_tag, str) else None,
            invocation_id=_peek(obj, "invocation_id"),
            function_id=_peek(obj, "function_id"),
        ) from None
    except orjson.JSONDecodeError as exc:
        raise MessageDecodeError(f"json decode error: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageDecodeError(f"expected a JSON object, got {type(obj).__name__}")
    type_tag = obj.get("type")
    cls = MESSAGE_TYPES.get(type_tag) if isinstance(type_tag, str) else None
    if cls is None:
        raise MessageDecodeError(
            f"unknown message type {bounded_repr(type_tag)}",
            invocation_id=_peek(obj, "invocation_id"),
            function_id=_peek(obj, "function_id"),
        )
    try:
        message: Message = CONVERTER.structure(obj, cls)
    except Exception as exc:  # cattrs raises a variety of errors; all mean "bad message"
        detail = (
            "; ".join(cattrs.transform_error(exc, format_exception=_format_field_error))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        raise MessageDecodeError(
            f"invalid {type_tag}: {truncate(detail)}",
            message_type=type_tag,
            invocation_id=_peek(obj, "invocation_id"),
            function_id=_peek(obj, "function_id"),
        ) from None
    return message


def encode_message(message: Message) -> str:
    """Encode a message as compact UTF-8 JSON text with its ``type`` tag."""
    obj = CONVERTER.unstructure(message)
    obj["type"] = message.TYPE
    return orjson.dumps(obj).decode()
