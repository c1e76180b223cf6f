"""Byte bounds for what the observability module keeps in memory.

Peers fill these stores: a worker's ``engine::log::*`` calls and its ``LOGS``,
``OTLP`` and ``MTRC`` telemetry frames, each up to ``max_message_size``.  So
each store is bounded in bytes as well as in entries, and each entry is
bounded on its own:

* :class:`BoundedRing`: the oldest entries are evicted first, until both the
  entry count and the accounted bytes are within bounds.  The newest entry is
  always kept: one entry is at most its store's byte bound (the config checks
  it) plus the few hundred bytes of fixed overhead a store counts per entry,
  so a store can exceed its bound by that much only when it holds one entry.
* :func:`fit_record`: a JSON record (a log entry, a metric point) cut so that
  its JSON encoding is at most a given number of bytes.  Nothing is refused:
  a log line or a data point is diagnostic, and its beginning is what a reader
  needs, so long text keeps its head and says how much was left out, and
  the record's ``attributes`` get :data:`NOTE_KEY` saying that it was cut.
  Short fields (ids, names, severity) are cut to :data:`SHORT_FIELD_BYTES`;
  the main text field and the attribute map share what is left (each keeps
  all of itself if it needs less than half); secondary maps (a log's
  ``resource``) get at most an eighth.
* :func:`encode_json`: orjson, with a fallback for what orjson refuses (lone
  surrogates, integers beyond 64 bits, nesting deeper than orjson writes),
  so a record the engine accepted can always be stored and listed.

Lifetime: none: pure functions and small containers owned by the stores.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

import attrs
import orjson

__all__ = [
    "keep_smallest",
    "NOTE_KEY",
    "SHORT_FIELD_BYTES",
    "BoundedRing",
    "Fitted",
    "cut_text",
    "encode_json",
    "fit_mapping",
    "fit_record",
]

T = TypeVar("T")

# The attribute that says a record was cut, and why.
NOTE_KEY = "iii.truncated"
# JSON bytes of a short field (an id, a name, a severity) in a record that was cut.
SHORT_FIELD_BYTES = 256
# Room kept for the "… (N more chars)" note after cut text (the ellipsis is 3 bytes).
_MORE_ROOM = 32
# Room kept for the NOTE_KEY attribute.
_NOTE_ROOM = 160
# Deeper values are stored as a string saying so (orjson writes at most 254 levels).
_MAX_DEPTH = 64
_INT64 = (-(2**63), 2**64 - 1)


def _more(count: int) -> str:
    return f"… ({count} more chars)"


class BoundedRing(Generic[T]):
    """Entries oldest first, within ``max_count`` entries and ``max_bytes`` accounted bytes."""

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count = max(1, max_count)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evicted = 0
        self._entries: deque[tuple[T, int]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[T]:
        return (entry for entry, _ in self._entries)

    def add(self, entry: T, size: int) -> None:
        """Keep ``entry`` (``size`` accounted bytes), evicting the oldest as needed."""
        self._entries.append((entry, size))
        self.bytes += size
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_count or self.bytes > self.max_bytes
        ):
            self.pop_oldest()

    def oldest(self) -> T | None:
        return self._entries[0][0] if self._entries else None

    def pop_oldest(self) -> None:
        _, size = self._entries.popleft()
        self.bytes -= size
        self.evicted += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


# -- encoding --------------------------------------------------------------------------------


def _scrub(value: Any, depth: int = 0) -> Any:
    """``value`` with what orjson refuses replaced by what it can write."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> "?"
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if depth >= _MAX_DEPTH:
        return "… (nested too deep)"
    if isinstance(value, Mapping):
        return {_scrub(str(key)): _scrub(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(item, depth + 1) for item in value]
    return _scrub(str(value))


def encode_json(value: Any) -> tuple[Any, bytes]:
    """``(value, its JSON)``; a value orjson refuses is scrubbed first (and returned scrubbed)."""
    try:
        return value, orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        value = _scrub(value)
        return value, orjson.dumps(value)


def keep_smallest(sizes: Mapping[str, int], room: int) -> tuple[set[str], int]:
    """The keys kept whole, smallest first, while they fit ``room``; and the room left."""
    whole: set[str] = set()
    for key in sorted(sizes, key=sizes.__getitem__):
        if sizes[key] > room:
            break
        whole.add(key)
        room -= sizes[key]
    return whole, room


def _size(value: Any) -> int:
    return len(encode_json(value)[1])


# -- cutting ---------------------------------------------------------------------------------


def cut_text(text: str, limit: int) -> tuple[str, int]:
    """The longest head of ``text`` whose JSON string is at most ``limit`` bytes, and how
    many characters were left out.  A head of n characters encodes to at least n + 2
    bytes, so at most ``limit - 2`` characters are ever encoded at once; the size grows
    with the length, so a binary search finds the longest head in about log2(limit)
    encodings."""
    count = min(len(text), max(0, limit - 2))
    if count == 0 or _size(text[:count]) <= limit:
        return text[:count], len(text) - count
    fits, too_long = 0, count  # the empty head's "" always fits: limit >= 2
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if _size(text[:middle]) <= limit:
            fits = middle
        else:
            too_long = middle
    return text[:fits], len(text) - fits


def _cut_with_note(text: str, limit: int) -> str:
    head, left_out = cut_text(text, limit - _MORE_ROOM)
    return head + _more(left_out) if left_out else head


def fit_mapping(mapping: Mapping[str, Any], limit: int) -> tuple[dict[str, Any], int]:
    """The items of ``mapping`` that fit in ``limit`` JSON bytes, and how many were cut
    or left out.  The smallest items are kept whole first; then the first string that
    did not fit is cut to the room left, if a useful part of it fits.  Items keep their
    order."""
    if _size(mapping) <= limit:
        return dict(mapping), 0
    sizes: dict[str, int] = {}
    for key, value in mapping.items():
        key_size = _size(key) + 2  # the colon and a comma
        if key_size <= SHORT_FIELD_BYTES:
            sizes[key] = key_size + _size(value)
    whole, room = keep_smallest(sizes, limit - 2)  # "{}"
    cut: dict[str, str] = {}  # at most one
    for key, value in mapping.items():
        if key in sizes and key not in whole and isinstance(value, str):
            value_room = room - (_size(key) + 2)
            if value_room >= _MORE_ROOM * 2:
                cut[key] = _cut_with_note(value, value_room)
            break
    kept = {
        key: cut.get(key, value) for key, value in mapping.items() if key in whole or key in cut
    }
    return kept, len(mapping) - len(whole)


@attrs.frozen
class Fitted:
    """A record as it is kept: ``encoded`` is its JSON, at most the limit it was fitted to."""

    record: dict[str, Any]
    encoded: bytes
    # The record's JSON size as given (before any cut).
    original_bytes: int
    truncated: bool


def _split(budget: int, first: int, second: int) -> tuple[int, int]:
    """Two shares of ``budget``: each part keeps all it needs if that is under half."""
    if first + second <= budget:
        return first, second
    half = budget // 2
    if first <= half:
        return first, budget - first
    if second <= half:
        return budget - second, second
    return half, budget - half


def fit_record(
    record: Mapping[str, Any],
    limit: int,
    *,
    main: str | None = None,
    primary: str = "attributes",
    secondary: tuple[str, ...] = (),
) -> Fitted:
    """``record`` cut so that its JSON is at most ``limit`` bytes (see the module docstring).

    ``main``: the text field that matters most (a log's ``body``); ``primary``:
    the attribute map, which also gets :data:`NOTE_KEY` when anything is cut;
    ``secondary``: maps that get at most an eighth of the room.  Other string
    fields are cut to :data:`SHORT_FIELD_BYTES`.  ``limit`` should leave room
    for the short fields (a few KiB).
    """
    given, encoded = encode_json(record)
    if len(encoded) <= limit:
        return Fitted(given, encoded, len(encoded), False)
    original = len(encoded)
    maps = (primary, *secondary)
    out = dict(given)
    for key, value in given.items():
        if key != main and key not in maps and isinstance(value, str):
            if _size(value) > SHORT_FIELD_BYTES:
                out[key] = _cut_with_note(value, SHORT_FIELD_BYTES)
    skeleton = dict(out)
    if main in skeleton:
        skeleton[main] = ""
    for key in maps:
        if key in skeleton:
            skeleton[key] = {}
    budget = limit - _size(skeleton) - _NOTE_ROOM
    for key in secondary:
        value = given.get(key)
        if isinstance(value, Mapping):
            out[key] = fit_mapping(value, max(2, budget // 8))[0]
            budget -= _size(out[key]) - 2
    attributes = given.get(primary)
    if not isinstance(attributes, Mapping):
        attributes = {}
    main_size = _size(given[main]) if main in given else 0
    main_share, primary_share = _split(max(0, budget), main_size, _size(attributes))
    if main is not None and main_size > main_share:
        value = given[main]
        text = value if isinstance(value, str) else encode_json(value)[1].decode()
        out[main] = _cut_with_note(text, main_share)
    note = f"this record's JSON was {original} bytes, over the limit of {limit}: values were cut"
    out[primary] = {**fit_mapping(attributes, primary_share)[0], NOTE_KEY: note}
    out, encoded = encode_json(out)
    if len(encoded) > limit:
        # The shares count every byte but the separators between fields; in
        # case they do not add up, keep the record's short fields and the note.
        skeleton[primary] = {NOTE_KEY: note}
        out, encoded = encode_json(skeleton)
    return Fitted(out, encoded, original, True)
