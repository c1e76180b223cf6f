"""The REST module's route table: ``http`` triggers by method and path pattern.

Pure and synchronous (no I/O): the module adds a :class:`Route` when an
``http`` trigger is registered and removes it when the trigger goes, so the
table always mirrors the live triggers (hot add and remove while serving).

Patterns (spec modules.md §1):

* ``api_path`` with or without a leading ``/`` is the same route; ``/a`` and
  ``/a/`` are different routes (a trailing slash matters);
* a segment ``:name`` (or axum's ``{name}``) is a path parameter matching one
  non-empty segment; everything else is a literal.

Matching and conflicts follow the router upstream uses (matchit):

* at each segment, from the left, a literal beats a parameter, so ``/users/me``
  and ``/users/:id`` live side by side and ``/users/me`` wins for that URL;
* two patterns of the same *shape* (same literals at the same places,
  parameters at the same places, whatever their names) for the same method
  are ambiguous.  For two different functions that is a conflict and the second
  is refused (:class:`RouteConflictError`; upstream v0.4 panicked).  For the
  same function it is accepted: the first registered answers.

Lifetime: one table per REST module, for its run.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import attrs

__all__ = [
    "METHODS",
    "Route",
    "RouteMatch",
    "RoutePattern",
    "RouteTable",
    "RouteConflictError",
    "RoutePatternError",
    "parse_pattern",
    "split_path",
]

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")

# A segment's shape: the literal text, or None for a parameter.
Shape = tuple[str | None, ...]


class RoutePatternError(ValueError):
    """An ``api_path`` that cannot be a route."""


class RouteConflictError(Exception):
    """Another function already answers this method and path shape."""

    def __init__(self, route: Route, existing: Route):
        super().__init__(
            f"route {route.method} {route.pattern.raw} conflicts with {existing.method} "
            f"{existing.pattern.raw} of function {existing.function_id}"
        )
        self.route = route
        self.existing = existing


@attrs.frozen
class RoutePattern:
    raw: str  # ``api_path`` exactly as the trigger config wrote it
    shape: Shape
    params: tuple[str | None, ...]  # parameter name per segment (None for a literal)

    @property
    def is_static(self) -> bool:
        return all(segment is not None for segment in self.shape)


def parse_pattern(api_path: str) -> RoutePattern:
    path = api_path if api_path.startswith("/") else "/" + api_path
    if any(c in path for c in "?#"):
        raise RoutePatternError(f"api_path {api_path!r} must not contain '?' or '#'")
    segments = split_path(path, decode=False)
    shape: list[str | None] = []
    params: list[str | None] = []
    for segment in segments:
        name = None
        if segment.startswith(":") and len(segment) > 1:
            name = segment[1:]
        elif segment.startswith("{") and segment.endswith("}") and len(segment) > 2:
            name = segment[1:-1]
        if name is not None:
            if name in params:
                raise RoutePatternError(f"api_path {api_path!r} names parameter {name!r} twice")
            shape.append(None)
            params.append(name)
        else:
            shape.append(unquote(segment))
            params.append(None)
    return RoutePattern(raw=api_path, shape=tuple(shape), params=tuple(params))


def split_path(path: str, *, decode: bool = True) -> list[str]:
    """``/a/b%20c/`` -> ``["a", "b c", ""]``; ``/`` -> ``[]``."""
    if path in ("", "/"):
        return []
    segments = path[1:].split("/") if path.startswith("/") else path.split("/")
    if decode:
        return [unquote(segment) for segment in segments]
    return segments


@attrs.define(eq=False)
class Route:
    method: str  # upper case
    pattern: RoutePattern
    function_id: str
    condition_function_id: str | None = None
    key: Any = None  # what the module files it under (its LogicalTrigger)


MATCH_CACHE_SIZE = 4096


@attrs.frozen
class RouteMatch:
    route: Route
    path_params: dict[str, str]


def _match(
    pattern: RoutePattern, segments: list[str]
) -> tuple[tuple[int, ...], dict[str, str]] | None:
    """The match's priority (literal = 1 per segment, left first) and its parameters."""
    priority = []
    params: dict[str, str] = {}
    for literal, name, segment in zip(pattern.shape, pattern.params, segments, strict=True):
        if literal is not None:
            if literal != segment:
                return None
            priority.append(1)
        else:
            if segment == "":
                return None  # a parameter matches one non-empty segment
            assert name is not None
            params[name] = segment
            priority.append(0)
    return tuple(priority), params


@attrs.define(eq=False)
class RouteTable:
    # (method, shape) -> routes of that shape, first registered first
    by_shape: dict[tuple[str, Shape], list[Route]] = attrs.field(factory=dict)
    # segment count -> routes, for matching
    by_length: dict[int, list[Route]] = attrs.field(factory=dict)
    # every route of a key (a trigger)
    by_key: dict[Any, Route] = attrs.field(factory=dict)
    # request path -> its matches, until the routes change (at most
    # MATCH_CACHE_SIZE paths: a path with parameters is one entry per value)
    _matches: dict[str, dict[str, RouteMatch]] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self.by_key)

    def add(self, route: Route) -> None:
        """File a route; raises :class:`RouteConflictError` on another function's route."""
        if route.key in self.by_key:
            raise ValueError(f"route key {route.key!r} is already filed")
        shape_key = (route.method, route.pattern.shape)
        for existing in self.by_shape.get(shape_key, ()):
            if existing.function_id != route.function_id:
                raise RouteConflictError(route, existing)
        self.by_shape.setdefault(shape_key, []).append(route)
        self.by_length.setdefault(len(route.pattern.shape), []).append(route)
        self.by_key[route.key] = route
        self._matches.clear()

    def remove(self, key: Any) -> Route | None:
        route = self.by_key.pop(key, None)
        if route is None:
            return None
        self._matches.clear()
        shape_key = (route.method, route.pattern.shape)
        same_shape = self.by_shape[shape_key]
        same_shape.remove(route)
        if not same_shape:
            del self.by_shape[shape_key]
        same_length = self.by_length[len(route.pattern.shape)]
        same_length.remove(route)
        if not same_length:
            del self.by_length[len(route.pattern.shape)]
        return route

    def match(self, path: str) -> dict[str, RouteMatch]:
        """The best match per method for a request path (raw, percent-encoded).

        The answer is shared by every request for that path until the routes
        change: callers must not modify it (or its ``path_params``).
        """
        found = self._matches.get(path)
        if found is None:
            found = self._match_all(path)
            if len(self._matches) >= MATCH_CACHE_SIZE:
                self._matches.clear()
            self._matches[path] = found
        return found

    def _match_all(self, path: str) -> dict[str, RouteMatch]:
        segments = split_path(path)
        best: dict[str, tuple[tuple[int, ...], RouteMatch]] = {}
        for route in self.by_length.get(len(segments), ()):
            found = _match(route.pattern, segments)
            if found is None:
                continue
            priority, params = found
            current = best.get(route.method)
            # Strictly greater: among equal shapes the first registered stays.
            if current is None or priority > current[0]:
                best[route.method] = (priority, RouteMatch(route, params))
        return {method: match for method, (_, match) in best.items()}
