"""What the client commands read and print: payloads in, JSON and tables out.

Payload of ``trigger`` (:func:`build_payload`), one source at most:
``--payload JSON`` (or upstream's ``--json JSON``), ``--payload-file F``
(``-`` is stdin) or a ``-`` argument (stdin); ``key=value`` arguments
(upstream's form: the value is JSON if it parses, else a string) build an
object, or override keys of the object given.  Nothing at all is ``{}``, as
upstream sends.  A payload that cannot be read is a
:class:`~iii.client.UsageError`, before anything is sent.

Output.  Every string in an answer came from a peer (a worker names its
functions, writes their descriptions and its errors; an engine can be
anyone's), and a terminal obeys escape sequences: one in a function id could
retitle the window, clear the screen or hide the rest of a line.  So:

* JSON (:func:`render_json`) is indented orjson, in which the JSON escapes
  already cover the C0 controls; the other characters :func:`iii.log.escape`
  escapes (DEL, the C1 controls, line and paragraph separators, bidi marks)
  are written as ``\\uXXXX`` too.  That is the same JSON value, byte-safe on a
  terminal: ``jq`` reads back exactly what the worker sent.
* Tables (:func:`render_table`) escape each cell with :func:`iii.log.clean`
  and cut it to its column's width budget; the JSON output has it whole.

Lifetime: none: pure functions (and reads of the payload sources).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

import orjson

from iii.client import MAX_MESSAGE_SIZE, CallFailedError, ClientError, UsageError
from iii.log import CONTINUATION, clean

__all__ = [
    "build_payload",
    "render_json",
    "render_table",
    "describe_failure",
    "TABLES",
    "STACKTRACE_LINES",
]

# The characters iii.log.escape escapes that JSON itself leaves raw (JSON
# escapes every C0 control inside a string; orjson never writes a lone
# surrogate).  tests/test_hostile_cli.py checks the two sets agree.
# A failed call's stack trace shows at most this many lines.
STACKTRACE_LINES: Final = 60
_RAW_IN_JSON: Final = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


# -- payload ------------------------------------------------------------------------------


def _parse_json(raw: str | bytes, source: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{source}: invalid JSON: {exc}") from None


def _read_limited(stream: IO[bytes], source: str) -> bytes:
    data = stream.read(MAX_MESSAGE_SIZE + 1)
    if len(data) > MAX_MESSAGE_SIZE:
        raise UsageError(f"{source}: larger than {MAX_MESSAGE_SIZE} bytes")
    return data


def _read_file(path: str, stdin: IO[bytes]) -> tuple[bytes, str]:
    if path == "-":
        return _read_limited(stdin, "stdin"), "stdin"
    source = f"--payload-file {path}"
    try:
        with Path(path).open("rb") as file:
            return _read_limited(file, source), source
    except OSError as exc:
        raise UsageError(f"{source}: cannot read: {exc.strerror or exc}") from None


def _key_values(tokens: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for token in tokens:
        key, equals, text = token.partition("=")
        if not equals:
            raise UsageError(f"expected key=value, got {token!r}")
        if not key:
            raise UsageError(f"the key of {token!r} is empty")
        try:
            values[key] = orjson.loads(text)
        except orjson.JSONDecodeError:
            values[key] = text
    return values


def build_payload(
    *,
    payload: str | None,
    json_text: str | None,
    payload_file: str | None,
    arguments: Sequence[str],
    stdin: IO[bytes],
) -> Any:
    """The payload of ``trigger`` from its options (see the module docstring)."""
    from_stdin = [token for token in arguments if token == "-"]
    pairs = [token for token in arguments if token != "-"]
    given = [
        source
        for source, present in (
            ("--payload", payload is not None),
            ("--json", json_text is not None),
            ("--payload-file", payload_file is not None),
            ("-", bool(from_stdin)),
        )
        if present
    ]
    if len(given) > 1 or len(from_stdin) > 1:
        raise UsageError(
            f"give one of --payload, --json, --payload-file or -, not {' and '.join(given)}"
        )
    base: Any
    if payload is not None:
        base, source = _parse_json(payload, "--payload"), "--payload"
    elif json_text is not None:
        base, source = _parse_json(json_text, "--json"), "--json"
    elif payload_file is not None:
        raw, source = _read_file(payload_file, stdin)
        base = _parse_json(raw, source)
    elif from_stdin:
        raw, source = _read_file("-", stdin)
        base = _parse_json(raw, source)
    else:
        base, source = None, ""
    overrides = _key_values(pairs)
    if not given:
        return overrides
    if not overrides:
        return base
    if not isinstance(base, dict):
        raise UsageError(f"{source} must be an object when combined with key=value arguments")
    return {**base, **overrides}


# -- output -------------------------------------------------------------------------------


def _unicode_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def render_json(value: Any) -> str:
    """``value`` as indented JSON text, one trailing newline, safe on a terminal."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    return _RAW_IN_JSON.sub(_unicode_escape, text) + "\n"


def _cell(value: Any, limit: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return clean(value, limit)
    return clean(orjson.dumps(value).decode(), limit)


def _age(since_ms: Any, now_ms: Any) -> str:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (since_ms, now_ms)):
        return ""
    seconds = max(0, int((now_ms - since_ms) / 1000))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _function_row(entry: Mapping[str, Any], answer: Mapping[str, Any]) -> list[str]:
    return [_cell(entry.get("function_id"), 120), _cell(entry.get("description"), 80)]


def _trigger_row(entry: Mapping[str, Any], answer: Mapping[str, Any]) -> list[str]:
    return [
        _cell(entry.get("id"), 60),
        _cell(entry.get("trigger_type"), 40),
        _cell(entry.get("function_id"), 120),
        _cell(entry.get("config"), 80),
    ]


def _worker_row(entry: Mapping[str, Any], answer: Mapping[str, Any]) -> list[str]:
    functions = entry.get("functions")
    count = entry.get("function_count", len(functions) if isinstance(functions, list) else None)
    return [
        _cell(entry.get("id"), 40),
        _cell(entry.get("name"), 40),
        _cell(entry.get("runtime"), 20),
        _cell(entry.get("version"), 20),
        _cell(entry.get("pid"), 10),
        _cell(count, 10),
        _cell(entry.get("active_invocations"), 10),
        _cell(entry.get("ip_address"), 40),
        _age(entry.get("connected_at_ms"), answer.get("timestamp")),
    ]


# For each list: its columns, how a row is made, and the sort key.
TABLES: Final = {
    "functions": (("FUNCTION_ID", "DESCRIPTION"), _function_row, ("function_id",)),
    "triggers": (("ID", "TYPE", "FUNCTION_ID", "CONFIG"), _trigger_row, ("trigger_type", "id")),
    "workers": (
        ("ID", "NAME", "RUNTIME", "VERSION", "PID", "FUNCTIONS", "ACTIVE", "ADDRESS", "CONNECTED"),
        _worker_row,
        ("name", "id"),
    ),
}


def _sort_key(entry: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(entry.get(key) or "") for key in keys)


def render_table(kind: str, answer: Mapping[str, Any]) -> str:
    """The entries of a checked list answer (``answer[kind]``) as aligned columns."""
    headers, make_row, sort_keys = TABLES[kind]
    entries = sorted(answer[kind], key=lambda entry: _sort_key(entry, sort_keys))
    rows = [list(headers)] + [make_row(entry, answer) for entry in entries]
    widths = [max(len(row[column]) for row in rows) for column in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def describe_failure(error: ClientError) -> str:
    """What a failed command prints on stderr: one line, then an error's stack trace.

    The stack trace (0.25 SDKs send one) keeps its lines, each escaped, cut
    and prefixed with :data:`iii.log.CONTINUATION`, at most
    :data:`STACKTRACE_LINES` of them.
    """
    lines = [f"iii: {clean(error.message)}"]
    stacktrace = error.error.stacktrace if isinstance(error, CallFailedError) else None
    if stacktrace:
        shown = stacktrace[: STACKTRACE_LINES * 400].splitlines()
        more = len(shown) - STACKTRACE_LINES
        lines += [CONTINUATION + clean(line, 400) for line in shown[:STACKTRACE_LINES]]
        if more > 0:
            lines.append(f"{CONTINUATION}… ({more} more lines)")
    return "\n".join(lines) + "\n"
