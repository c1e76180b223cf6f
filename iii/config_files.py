"""Reading a config file into plain data: YAML or TOML, with every hostile shape refused.

A config file is read by a person's tool (``check-config``) and by the
engine at start, often under systemd, so a file must never make the loader
run out of memory or stack, nor end in a traceback.  Each of these is a
:class:`~iii.errors.ConfigError` naming the file (and the key or the line):

* a file larger than :data:`MAX_FILE_BYTES`, or not UTF-8;
* YAML aliases that expand to more than :data:`MAX_VALUES` values (the
  "billion laughs": ten anchors of ten aliases each are 10**10 strings once
  expanded, while the file is 600 bytes), or an alias inside its own anchor;
* nesting deeper than :data:`MAX_DEPTH` levels, counted after alias
  expansion (everything that walks the tree later, env expansion and
  cattrs, recurses once per level);
* a mapping that gives the same key twice (PyYAML would keep the last one
  silently); YAML merge keys (``<<``) are not duplicates: the explicit key wins,
  as YAML says;
* values PyYAML or tomllib cannot build (a 5,000-digit integer, 2020-13-45).

How: a :class:`yaml.SafeLoader` subclass bounds the depth while it composes
the node graph (the composer recurses once per level), then
:func:`_check_nodes` walks the graph once, with each shared node's size
remembered, before anything is constructed.  TOML has no aliases; tomllib
recurses per level, so its :class:`RecursionError` is caught and the result
is walked for depth.

Nothing here opens anything but the file; no state outlives a call.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from yaml import MappingNode, Node, ScalarNode, SequenceNode

from iii.errors import ConfigError

__all__ = ["read_config_file", "MAX_FILE_BYTES", "MAX_DEPTH", "MAX_VALUES"]

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_VALUES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"
_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"


def read_config_file(path: Path) -> Any:
    """The parsed content of a YAML (or ``.toml``) config file; raises ConfigError.

    ``OSError`` (no such file, unreadable) is left to the caller.
    """
    file = str(path)
    with open(path, "rb") as stream:
        data = stream.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"the file is larger than {MAX_FILE_BYTES} bytes", file=file)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})", file=file
        ) from None
    if path.suffix.lower() == ".toml":
        return _parse_toml(text, file)
    return _parse_yaml(text, file)


# -- TOML ---------------------------------------------------------------------------


def _parse_toml(text: str, file: str) -> Any:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=file) from None
    except RecursionError:
        # tomllib is a recursive-descent parser with no depth limit of its own.
        raise ConfigError(f"invalid TOML: {_TOO_DEEP}", file=file) from None
    except ValueError as exc:  # e.g. an integer past Python's 4,300-digit conversion limit
        raise ConfigError(f"invalid TOML: {exc}", file=file) from None
    _check_data_depth(data, file)
    return data


def _check_data_depth(root: Any, file: str) -> None:
    """Refuse parsed data nested deeper than MAX_DEPTH (iteratively: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(root, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            children = [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        if depth > MAX_DEPTH:
            raise ConfigError(_TOO_DEEP, file=file, key=path or None)
        stack.extend((child, child_path, depth + 1) for child, child_path in children)


# -- YAML ---------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no types
    """PyYAML's safe loader, refusing deep nesting while composing.

    The composer calls ``compose_node`` once per level, recursively: without
    a bound, 20,000 ``[`` end in a RecursionError.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(_TOO_DEEP, line=mark.line + 1)
            node: Node = super().compose_node(parent, index)
            return node
        finally:
            self.depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:
            # A scalar PyYAML's safe constructors fail on with a bare Python
            # error: 2020-13-45 (ValueError), a 5,000-digit int (ValueError),
            # an empty ``!!int`` (IndexError), ``!!bool x`` (KeyError).
            kind = str(node.tag).rsplit(":", 1)[-1][:40]
            detail = str(exc)[:200]  # int("…") quotes the whole literal
            problem = f"not a valid {kind}: {detail}" if detail else f"not a valid {kind}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


class _Refused(Exception):
    """A bound was passed: becomes a ConfigError naming the file."""

    def __init__(self, reason: str, *, key: str | None = None, line: int | None = None):
        super().__init__(reason)
        self.reason = reason if line is None else f"{reason} (line {line})"
        self.key = key


def _parse_yaml(text: str, file: str) -> Any:
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # checks the characters first (ReaderError)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError(exc.reason, file=file, key=exc.key) from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"invalid YAML: {_one_line(exc)}", file=file) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {' '.join(str(exc).split())}", file=file) from None
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(exc: yaml.MarkedYAMLError) -> str:
    text = exc.problem or "error"
    if exc.problem_mark is not None:
        text += f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    if exc.context:
        text += f" ({exc.context}"
        if exc.context_mark is not None:
            text += f" at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        text += ")"
    return " ".join(text.split())


def _check_nodes(root: Node) -> None:
    """One walk of the composed graph before anything is built.

    Counts the values the tree holds once aliases are expanded and its depth,
    remembering each node's (values, height) so a shared anchor is walked once;
    finds duplicate keys and aliases inside their own anchor.  Recursion here
    is bounded by MAX_DEPTH.
    """
    seen: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height)
    open_nodes: set[int] = set()

    def visit(node: Node, path: str, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise _Refused(f"{_TOO_DEEP} (aliases expanded)", key=path or None)
        key = id(node)
        if key in open_nodes:
            reason = "an alias refers to itself (a recursive structure)"
            raise _Refused(reason, key=path or None, line=node.start_mark.line + 1)
        known = seen.get(key)
        if known is not None:
            if depth + known[1] - 1 > MAX_DEPTH:
                raise _Refused(f"{_TOO_DEEP} (aliases expanded)", key=path or None)
            return known
        open_nodes.add(key)
        values, height = 1, 1
        for child, child_path in _children(node, path):
            child_values, child_height = visit(child, child_path, depth + 1)
            values += child_values
            height = max(height, child_height + 1)
            if values > MAX_VALUES:
                raise _Refused(
                    f"aliases expand to more than {MAX_VALUES} values (refused before expanding)",
                    key=path or None,
                )
        open_nodes.discard(key)
        seen[key] = (values, height)
        return values, height

    visit(root, "", 1)


def _children(node: Node, path: str) -> list[tuple[Node, str]]:
    if isinstance(node, SequenceNode):
        return [(child, f"{path}[{i}]") for i, child in enumerate(node.value)]
    if not isinstance(node, MappingNode):
        return []
    children: list[tuple[Node, str]] = []
    first_line: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE_TAG:
            name = str(key_node.value)
            child_path = f"{path}.{name}" if path else name
            line = key_node.start_mark.line + 1
            previous = first_line.get((key_node.tag, name))
            if previous is not None:
                reason = f"duplicate key (first at line {previous}, again at line {line})"
                raise _Refused(reason, key=child_path)
            first_line[(key_node.tag, name)] = line
        else:
            child_path = path  # a merge key, or a complex key (not a config key)
        children.append((key_node, child_path))
        children.append((value_node, child_path))
    return children
