"""Update ops: the atomic edits ``state::update``, ``stream::update`` and
``kv_server::update`` apply to a stored JSON value (spec modules.md §0.3).

One pure function, :func:`apply_ops`, used by every backend: the embedded
store runs it inside its write, the Redis backends run it between a read and
a compare-and-set script.  The same op sequence therefore gives the same value
on every backend (a hypothesis property checks it).

Wire shape (internally tagged by ``type``, as the SDKs send it)::

    {"type": "set",       "path": P, "value": any}
    {"type": "merge",     "path": P?, "value": {...}}
    {"type": "increment", "path": P, "by": number}
    {"type": "decrement", "path": P, "by": number}
    {"type": "remove",    "path": P}
    {"type": "append",    "path": P?, "value": any}

A path ``P`` is a string naming one top-level field, or a list of strings
naming a nested field (``["user", "address", "city"]``).  ``""``, ``[]`` and
a missing path mean the whole value (the root).  Dots are not separators: a
field may be named ``"a.b"``.

Semantics (v0.4 quirks fixed, HEAD's additions kept):

* A missing key starts as ``{}``; root ``increment``/``decrement`` on a
  missing key start from 0 and root ``append`` from null.
* Walking a nested path creates missing intermediate objects.  An existing
  value in the way that is not an object is an error for that op.
* ``set`` writes the value (null included); at the root it replaces the value.
* ``merge`` needs an object value and merges its keys shallowly into the
  object at the path (created when missing).
* ``increment``/``decrement``: ``by`` is any number.  A missing field becomes
  ``by`` / ``-by``; an int or float field is added to (floats are numbers, not
  "non-integers"); anything else (string, bool, object …) is an error and the
  field is left as it was (v0.4 overwrote it, or set it to 0).
* ``remove`` deletes the field (a missing one is fine); at the root the value
  becomes null.
* ``append``: to an array, the value is pushed; to a string, a string value
  is concatenated; to a missing or null field, a string stays a string and
  anything else becomes ``[value]``.  Other combinations are errors.
* Every result can be stored and sent again (:mod:`iii.json_limits`): an
  ``increment``/``decrement`` whose result is not a finite float or a 64-bit
  integer fails with ``<op>.overflow`` (v0.4 stored ``null`` for an
  overflowing float), and a ``set``/``merge``/``append`` that would nest the
  value deeper than 126 levels (what a worker can send back in a ``set``)
  fails with ``<op>.too_deep``.  Either way the field is left as it was.

An op that fails is skipped and reported; the others still apply, and the
result is written (HEAD's behaviour).  Errors come back as
``{"op_index", "code", "message"}`` entries, codes like
``increment.not_number`` or ``set.target_not_object``.  An op that is not
an op at all (unknown ``type``, missing ``path``) fails the whole call with
:class:`~iii.errors.DeserializationError` before anything is written.

Lifetime: none: pure functions and value types.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs

from iii import json_limits
from iii.errors import DeserializationError
from iii.log import bounded_repr

__all__ = ["UpdateOp", "UpdateResult", "OpError", "parse_ops", "apply_ops", "MISSING"]

OP_TYPES = ("set", "merge", "increment", "decrement", "remove", "append")
# Ops whose path may be omitted (HEAD: merge/append default to the root).
_OPTIONAL_PATH = ("merge", "append")
MAX_PATH_DEPTH = 32


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@attrs.frozen
class UpdateOp:
    type: str
    path: tuple[str, ...]
    value: Any = None
    by: int | float = 0


@attrs.frozen
class OpError:
    op_index: int
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"op_index": self.op_index, "code": self.code, "message": self.message}


@attrs.frozen
class UpdateResult:
    old_value: Any
    new_value: Any
    errors: tuple[OpError, ...] = ()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"old_value": self.old_value, "new_value": self.new_value}
        if self.errors:
            body["errors"] = [e.to_json() for e in self.errors]
        return body


def _parse_path(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and all(isinstance(s, str) and s for s in raw):
        if len(raw) > MAX_PATH_DEPTH:
            raise DeserializationError(f"{where}: path deeper than {MAX_PATH_DEPTH} segments")
        return tuple(raw)
    raise DeserializationError(f"{where}: path must be a string or a list of non-empty strings")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_ops(raw: Any, function_id: str = "update") -> list[UpdateOp]:
    """Validate the wire ``ops`` array; raises ``deserialization_error``."""
    prefix = f"Failed to deserialize input for {function_id}"
    if not isinstance(raw, list):
        raise DeserializationError(f"{prefix}: ops must be an array")
    ops = []
    for index, item in enumerate(raw):
        where = f"{prefix}: ops[{index}]"
        if not isinstance(item, dict):
            raise DeserializationError(f"{where}: expected an object")
        kind = item.get("type")
        if kind not in OP_TYPES:
            raise DeserializationError(
                f"{where}: unknown op type {bounded_repr(kind)} "
                f"(expected one of {', '.join(OP_TYPES)})"
            )
        if "path" not in item and kind not in _OPTIONAL_PATH:
            raise DeserializationError(f"{where}: missing field path")
        path = _parse_path(item.get("path"), where)
        if kind in ("increment", "decrement"):
            by: Any = item.get("by")
            if not _number(by):
                raise DeserializationError(f"{where}: by must be a number")
            ops.append(UpdateOp(kind, path, by=by))
        elif kind in ("merge", "append"):
            if "value" not in item:
                raise DeserializationError(f"{where}: missing field value")
            ops.append(UpdateOp(kind, path, value=item["value"]))
        elif kind == "set":
            ops.append(UpdateOp(kind, path, value=item.get("value")))
        else:
            ops.append(UpdateOp(kind, path))
    return ops


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if _number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _label(path: tuple[str, ...]) -> str:
    return "root" if not path else ".".join(path) if len(path) == 1 else "[" + ", ".join(path) + "]"


class _OpFailed(Exception):
    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message


def _parent(root: Any, op: UpdateOp) -> dict[str, Any]:
    """The object holding the field ``op.path[-1]``; creates missing objects."""
    if not isinstance(root, dict):
        raise _OpFailed(
            f"{op.type}.target_not_object",
            f"Cannot {op.type} at path '{_label(op.path)}': the value is {_type_name(root)}, expected object.",
        )
    node = root
    for depth, segment in enumerate(op.path[:-1]):
        child = node.get(segment, MISSING)
        if child is MISSING:
            child = node[segment] = {}
        elif not isinstance(child, dict):
            raise _OpFailed(
                f"{op.type}.target_not_object",
                f"Cannot {op.type} at path '{_label(op.path)}': "
                f"'{_label(op.path[: depth + 1])}' is {_type_name(child)}, expected object.",
            )
        node = child
    return node


def _add(current: Any, op: UpdateOp) -> Any:
    delta = op.by if op.type == "increment" else -op.by
    if current is MISSING:
        result = delta
    elif not _number(current):
        raise _OpFailed(
            f"{op.type}.not_number",
            f"Expected number at path '{_label(op.path)}', got {_type_name(current)}.",
        )
    else:
        result = current + delta
    if not json_limits.check_number(result):
        kind = "a 64-bit integer" if isinstance(result, int) else "a finite number"
        raise _OpFailed(
            f"{op.type}.overflow",
            f"Cannot {op.type} at path '{_label(op.path)}' by {op.by!r}: the result is not {kind}.",
        )
    return result


def _check_nesting(op: UpdateOp) -> None:
    """Refuse an op whose value, put at its path, would nest deeper than MAX_VALUE_DEPTH.

    What is stored already is within the bound (each write was checked), so
    only the new part can go beyond it: the path's objects, plus the array
    ``append`` puts the value in, plus the value's own depth.
    """
    around = len(op.path) + (1 if op.type == "append" else 0)
    if json_limits.depth_exceeds(op.value, json_limits.MAX_VALUE_DEPTH - around):
        raise _OpFailed(
            f"{op.type}.too_deep",
            f"Cannot {op.type} at path '{_label(op.path)}': "
            f"the value would be nested deeper than {json_limits.MAX_VALUE_DEPTH} levels.",
        )


def _appended(current: Any, op: UpdateOp) -> Any:
    value = op.value
    if current is MISSING or current is None:
        return value if isinstance(value, str) else [value]
    if isinstance(current, list):
        return [*current, value]
    if isinstance(current, str) and isinstance(value, str):
        return current + value
    raise _OpFailed(
        "append.type_mismatch",
        f"Cannot append {_type_name(value)} at path '{_label(op.path)}': "
        f"the field is {_type_name(current)}, expected array, string, null or missing.",
    )


def _merged(current: Any, op: UpdateOp) -> dict[str, Any]:
    if current is MISSING:
        return dict(op.value)
    if not isinstance(current, dict):
        raise _OpFailed(
            "merge.target_not_object",
            f"Cannot merge at path '{_label(op.path)}': the field is {_type_name(current)}, expected object.",
        )
    return {**current, **op.value}


def _apply_one(root: Any, op: UpdateOp) -> Any:
    """Apply one op to ``root`` (may be MISSING); returns the new root.

    Mutates ``root`` in place where it can; callers pass a private copy.  It
    checks everything that can fail before it changes anything, so a failed
    op leaves ``root`` as it was.
    """
    if op.type == "merge" and not isinstance(op.value, dict):
        raise _OpFailed("merge.value.not_an_object", "Merge value must be a JSON object.")
    if op.type in ("set", "merge", "append"):
        _check_nesting(op)
        # The op's value must not be aliased into the result: a later op
        # would change it in place, and ops are re-applied on a retry.
        op = attrs.evolve(op, value=copy.deepcopy(op.value))
    if not op.path:
        if op.type == "set":
            return op.value
        if op.type == "remove":
            return None
        if op.type in ("increment", "decrement"):
            return _add(root, op)
        if op.type == "append":
            return _appended(root, op)
        return _merged({} if root is MISSING else root, op)
    if root is MISSING:
        root = {}
    parent = _parent(root, op)
    leaf = op.path[-1]
    if op.type == "set":
        parent[leaf] = op.value
    elif op.type == "remove":
        parent.pop(leaf, None)
    elif op.type in ("increment", "decrement"):
        parent[leaf] = _add(parent.get(leaf, MISSING), op)
    elif op.type == "append":
        parent[leaf] = _appended(parent.get(leaf, MISSING), op)
    else:
        parent[leaf] = _merged(parent.get(leaf, MISSING), op)
    return root


def apply_ops(old_value: Any, ops: list[UpdateOp]) -> tuple[Any, tuple[OpError, ...]]:
    """The new value after ``ops``, and the ops that failed.

    ``old_value`` is :data:`MISSING` for a key that does not exist.  It is
    never modified: the ops work on a deep copy.
    """
    current = MISSING if old_value is MISSING else copy.deepcopy(old_value)
    errors = []
    for index, op in enumerate(ops):
        try:
            current = _apply_one(current, op)
        except _OpFailed as failure:
            errors.append(OpError(index, failure.code, failure.message))
    if current is MISSING:
        current = {}
    return current, tuple(errors)
