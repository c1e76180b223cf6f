"""The route table: patterns, matching priority, conflicts, hot add and remove."""

from __future__ import annotations

import pytest

from iii.modules.rest_api.routes import (
    Route,
    RouteConflictError,
    RoutePatternError,
    RouteTable,
    parse_pattern,
)


def route(method: str, api_path: str, function_id: str, key: object = None) -> Route:
    return Route(
        method=method,
        pattern=parse_pattern(api_path),
        function_id=function_id,
        key=key if key is not None else object(),
    )


def test_leading_slash_is_optional_and_trailing_slash_matters():
    assert parse_pattern("todo/:id").shape == parse_pattern("/todo/:id").shape == ("todo", None)
    assert parse_pattern("/a/").shape == ("a", "")
    assert parse_pattern("/").shape == ()
    table = RouteTable()
    table.add(route("GET", "a", "f"))
    assert table.match("/a")["GET"].route.function_id == "f"
    assert table.match("/a/") == {}


def test_path_params_are_decoded_and_named():
    table = RouteTable()
    table.add(route("GET", "/users/:id/files/{name}", "f"))
    found = table.match("/users/42/files/a%20b.txt")["GET"]
    assert found.path_params == {"id": "42", "name": "a b.txt"}
    assert found.route.pattern.raw == "/users/:id/files/{name}"
    assert table.match("/users//files/x") == {}  # a parameter needs a segment


def test_literal_beats_parameter_from_the_left():
    table = RouteTable()
    table.add(route("GET", "/users/:id", "by_id"))
    table.add(route("GET", "/users/me", "me"))
    table.add(route("GET", "/a/:x/b", "axb"))
    table.add(route("GET", "/a/c/:y", "acy"))
    assert table.match("/users/me")["GET"].route.function_id == "me"
    assert table.match("/users/7")["GET"].route.function_id == "by_id"
    assert table.match("/a/c/b")["GET"].route.function_id == "acy"
    assert table.match("/a/z/b")["GET"].route.function_id == "axb"


def test_same_shape_for_another_function_is_a_conflict():
    table = RouteTable()
    table.add(route("GET", "/a/:x", "f"))
    with pytest.raises(RouteConflictError, match="conflicts with GET /a/:x of function f"):
        table.add(route("GET", "a/:y", "g"))
    # another method, or the same function again, is fine
    table.add(route("POST", "/a/:y", "g"))
    table.add(route("GET", "/a/:z", "f"))
    assert table.match("/a/1")["GET"].route.pattern.raw == "/a/:x"
    assert set(table.match("/a/1")) == {"GET", "POST"}


def test_remove_frees_the_route_and_the_shape():
    table = RouteTable()
    key = object()
    table.add(route("GET", "/a/:x", "f", key))
    assert table.remove(key).function_id == "f"
    assert table.remove(key) is None
    assert table.match("/a/1") == {}
    table.add(route("GET", "/a/:y", "g"))  # no longer a conflict
    assert len(table) == 1


def test_bad_patterns():
    with pytest.raises(RoutePatternError):
        parse_pattern("/a/:x/:x")
    with pytest.raises(RoutePatternError):
        parse_pattern("/a?b=1")
