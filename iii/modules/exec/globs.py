"""The ``watch`` patterns of an exec pipeline: checked once, then matched and watched.

A pattern is a glob relative to the engine's working directory (wcmatch's
syntax with ``GLOBSTAR`` and ``BRACE``):

* ``*`` and ``?`` match within one path segment, ``[abc]`` one character;
* ``**`` as a whole segment matches any number of directories (none included):
  ``steps/**/*.py`` matches ``steps/a.py`` and ``steps/x/y/a.py``;
* ``{ts,js}`` is a list of alternatives (upstream's playground writes
  ``steps/**/*.{ts,js}``);
* names starting with a dot are matched only by a pattern that says so, so an
  editor's ``.#file.py`` lock or ``.file.py.swp`` swap file is no change.

Refused, each a clear error (exit 2 at ``check-config``): an empty pattern, an
absolute one or one with a ``..`` segment (outside the working directory), a
control character, ``**`` inside a segment (``steps/**.py``: write
``steps/**/*.py``), and an unclosed ``[`` or ``{``.

:func:`watch_roots` gives the directories to hand to the file watcher: for
each pattern the part before its first wildcard (its nearest existing
ancestor, when that directory does not exist yet) and whether it must be
watched recursively.

wcmatch is used, not ``fnmatch`` (whose ``*`` crosses ``/``) nor
``PurePath.match`` (no ``**`` before Python 3.13, no braces).

Lifetime: pure values and functions.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import attrs
from wcmatch import glob as wcglob

__all__ = ["check_pattern", "WatchPatterns", "WatchRoot"]

_FLAGS = wcglob.GLOBSTAR | wcglob.BRACE
_MAGIC = re.compile(r"[*?\[{]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_pattern(pattern: str) -> str | None:
    """Why ``pattern`` is refused, or None when it is a good watch glob."""
    if not pattern.strip():
        return "an empty pattern"
    if _CONTROL.search(pattern):
        return "a control character in the pattern"
    if pattern.startswith("/"):
        return "an absolute path: patterns are relative to the engine's working directory"
    segments = pattern.rstrip("/").split("/")
    if ".." in segments:
        return "a '..' segment: patterns stay inside the engine's working directory"
    for segment in segments:
        if "**" in segment and segment != "**":
            return (
                f"'**' inside the segment {segment!r}: write it as a whole segment (steps/**/*.py)"
            )
    unclosed = _unclosed(pattern)
    if unclosed:
        return f"an unclosed {unclosed!r}"
    return None


def _unclosed(pattern: str) -> str | None:
    """The first bracket or brace left open (escapes with a backslash are skipped)."""
    brackets = 0
    braces = 0
    escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif brackets:
            brackets -= char == "]"
        elif char == "[":
            brackets = 1
        elif char == "{":
            braces += 1
        elif char == "}" and braces:
            braces -= 1
    if brackets:
        return "["
    if braces:
        return "{"
    return None


@attrs.frozen
class WatchRoot:
    path: Path
    recursive: bool


@attrs.frozen
class WatchPatterns:
    """Checked patterns, matched against paths under ``base`` (the working directory)."""

    base: Path
    patterns: tuple[str, ...]

    def matches(self, path: str | Path) -> bool:
        """Whether a changed file (absolute, or relative to ``base``) matches a pattern."""
        candidate = Path(path)
        if candidate.is_absolute():
            try:
                candidate = candidate.relative_to(self.base)
            except ValueError:
                return False
        relative = candidate.as_posix()
        return any(wcglob.globmatch(relative, pattern, flags=_FLAGS) for pattern in self.patterns)

    def roots(self) -> list[WatchRoot]:
        """The directories to watch, without one inside another that is watched recursively."""
        found: dict[Path, bool] = {}
        for pattern in self.patterns:
            root = _root_of(self.base, pattern)
            found[root.path] = found.get(root.path, False) or root.recursive
        roots = sorted(found.items())
        kept: list[WatchRoot] = []
        for path, recursive in roots:
            if any(k.recursive and path.is_relative_to(k.path) for k in kept):
                continue
            kept.append(WatchRoot(path, recursive))
        return kept


def _root_of(base: Path, pattern: str) -> WatchRoot:
    segments = PurePosixPath(pattern.rstrip("/")).parts
    literal: list[str] = []
    for segment in segments:
        if _MAGIC.search(segment):
            break
        literal.append(segment)
    rest = list(segments[len(literal) :])
    if not rest:
        # A literal file name: watch the directory it is in.
        literal, rest = literal[:-1], literal[-1:]
    recursive = len(rest) > 1 or "**" in rest
    root = base.joinpath(*literal)
    while not root.is_dir() and root != base:
        # Not there yet: watch the nearest directory that is, all the way down.
        root = root.parent
        recursive = True
    return WatchRoot(root, recursive)
