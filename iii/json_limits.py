"""The bounds every JSON value in the engine keeps, and the one way to read JSON from a peer.

A value the engine accepted must never fail later, when the engine encodes
it again (into a frame for a trigger, a log record, a Redis message …).
orjson reads documents nested up to 1024 levels but writes only about 254,
and it cannot write integers outside 64 bits; so:

* **Depth.**  :data:`MAX_DEPTH` (128) levels of arrays and objects, counted
  over the whole document as received (``[]`` is 1 level, ``{"a": []}``
  2).  Upstream's Rust engine at v0.4 reads with serde_json's default
  recursion limit of 128, which refuses the 128th level: every document it
  accepts is accepted here.  The engine wraps a value in at most a few
  levels of its own when it sends it on, far below orjson's limit.
  :func:`loads` enforces it on everything read from a peer (worker frames,
  REST bodies, stream clients, HTTP function responses, telemetry, shared
  backends).  A value the engine builds itself (update ops) is held to
  :data:`MAX_VALUE_DEPTH` (126), the deepest value a worker can send as a
  call's input field (``{"type": …, "data": {"value": …}}``), so whatever is
  stored can be read and written back by a worker.
* **Numbers.**  Decoding cannot produce an unencodable number: orjson reads
  an integer beyond 64 bits as a float (as serde_json does) and refuses a
  literal that overflows a double (``1e400``).  Only arithmetic can (update
  ops' ``increment``); :func:`check_number` is its test.

Both checks are cheap on the hot path.  A document cannot nest deeper than
half its length, nor than its count of ``[`` and ``{`` (each level needs its
own), so a typical frame is cleared by its length or by two C-speed
``count`` calls.  A larger one is checked by orjson itself, at C speed: the
value is encoded inside enough extra levels that orjson's own write limit
falls exactly at :data:`MAX_DEPTH`.  ``bench/bench_json_limits.py``: that
adds 10 to 50% to ``orjson.loads`` on frames with hundreds of containers or
more, 4 to 10 times less than a walk in Python would.  Only a value that
fails it is walked in Python, to be sure.

Lifetime: none: constants and pure functions (the orjson write limit is
measured once, at import).
"""

from __future__ import annotations

import math
from typing import Any, Final

import orjson

__all__ = [
    "MAX_DEPTH",
    "MAX_VALUE_DEPTH",
    "JsonTooDeepError",
    "loads",
    "check_depth",
    "depth_exceeds",
    "check_number",
    "INT_MIN",
    "INT_MAX",
]

MAX_DEPTH: Final = 128
# A value inside a frame's ``data`` object: the frame and ``data`` take two levels.
MAX_VALUE_DEPTH: Final = MAX_DEPTH - 2
# The integers orjson (and serde_json's Number) can write: i64 and u64.
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1


class JsonTooDeepError(orjson.JSONDecodeError):
    """A JSON document or value nested deeper than :data:`MAX_DEPTH`.

    A subclass of ``orjson.JSONDecodeError`` (a ``ValueError``): code that
    treats undecodable JSON as bad input treats this the same way.  From
    :func:`loads`, ``document`` is what was decoded, so that a caller can
    still read an id from it to answer.
    """

    def __init__(self, limit: int = MAX_DEPTH, *, document: Any = None):
        self.limit = limit
        self.document = document
        super().__init__(self.reason, "", 0)

    @property
    def reason(self) -> str:
        return f"nested deeper than {self.limit} levels"

    def __str__(self) -> str:
        return self.reason


def _orjson_write_limit() -> int:
    """The deepest nesting orjson can write (254 for orjson 3.x), measured."""

    def writable(depth: int) -> bool:
        value: Any = []
        for _ in range(depth - 1):
            value = [value]
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            return False
        return True

    low, high = 1, 4096
    while low < high:
        middle = (low + high + 1) // 2
        if writable(middle):
            low = middle
        else:
            high = middle - 1
    return low


_WRITE_LIMIT: Final = _orjson_write_limit()


def _walk_exceeds(value: Any, limit: int) -> bool:
    """Exact, in Python: does ``value`` nest deeper than ``limit``?"""
    if type(value) is not dict and type(value) is not list:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def depth_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Does the JSON value ``value`` nest deeper than ``limit`` levels?"""
    padding = _WRITE_LIMIT - limit
    if padding < 0:
        return _walk_exceeds(value, limit)
    wrapped = value
    for _ in range(padding):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        # Too deep, or unencodable for another reason (a value the engine
        # built): only the exact walk can tell.
        return _walk_exceeds(value, limit)
    return False


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`JsonTooDeepError` if ``value`` nests deeper than ``limit``."""
    if depth_exceeds(value, limit):
        raise JsonTooDeepError(limit)


def loads(raw: str | bytes | bytearray | memoryview) -> Any:
    """``orjson.loads``, refusing a document nested deeper than :data:`MAX_DEPTH`.

    Raises ``orjson.JSONDecodeError`` for what is not JSON and its subclass
    :class:`JsonTooDeepError` for what nests too deep.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Deeper than orjson reads at all (1024).  Its message is the only
        # sign; should it change, such a document is still refused, as not JSON.
        if str(exc).startswith("depth limit exceeded"):
            raise JsonTooDeepError() from None
        raise
    if len(raw) <= 2 * MAX_DEPTH:  # each level takes two characters at least
        return value
    if isinstance(raw, str):
        openers = raw.count("[") + raw.count("{")
    else:
        data = bytes(raw) if isinstance(raw, memoryview) else raw
        openers = data.count(b"[") + data.count(b"{")
    if openers > MAX_DEPTH and depth_exceeds(value):
        raise JsonTooDeepError(document=value)
    return value


def check_number(value: int | float) -> bool:
    """Can this number be stored and sent as JSON (an i64/u64 integer, a finite float)?"""
    if isinstance(value, int):
        return INT_MIN <= value <= INT_MAX
    return math.isfinite(value)
