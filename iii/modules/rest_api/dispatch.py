"""One HTTP request on the REST port: route it, call the function, answer.

The payload the function receives and the answers it can give are spec
protocol.md §5.2 / modules.md §1:

* payload ``{query_params, path_params, headers, path, method, body, trigger,
  request_body, response}``: ``path`` is the registered ``api_path``; query
  values and header values are single strings (the last one wins); header
  names are lower case; ``body`` is parsed JSON when the content type says
  ``application/json`` (invalid JSON is null), and null otherwise, in which case
  the raw body is streamed into the ``request_body`` channel in chunks of at
  most 64 KiB *while* the function runs;
* simple answer: the function returns ``{status_code, body, headers}``
  (status 200 and body ``{}`` by default, the body sent as JSON; ``headers``
  as a map or a list of ``"Name: value"`` — honoured, unlike upstream v0.4);
* streamed answer: the function writes to the ``response`` channel: text
  frames ``{"type":"set_status"}`` / ``{"type":"set_headers"}``, binary body
  frames, then close.  The head goes out with the first body frame (or at the
  close), the body follows as it comes (chunked), so server-sent events and
  large downloads stream.  A function that returns null and never writes gets
  a 504 once ``default_timeout`` has passed.

``default_timeout`` bounds everything up to the response head (waiting for a
concurrency slot, the condition, the call); after the head, each gap between
body frames is bounded by it as well.  Errors are JSON
``{"error": {"code", "message", "error_id"}}``: 404 no route, 405 wrong
method, 413 body too large, 422 condition not met, 500 function error, 503
no room for a JSON body before the deadline (:mod:`.bodies`, with
``Retry-After``), 504 timeout.  Details of a 500 are logged with its
``error_id``, not sent.

Lifetime: the call runs in the request's own task (:mod:`.exchange`); the
body feeder and the response reader are side tasks of that request
(:mod:`.side_tasks`), started only when the function opens those channels (a
function that just returns costs no task and no nursery), hosted in the
dispatcher's own nursery (:meth:`RestDispatcher.run`) and joined before the
request ends; its two channels are removed when the request ends.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import h11
import orjson
import trio

from iii import json_limits
from iii.channels import random_uuid
from iii.errors import IIIError
from iii.grants import Grant
from iii.inbound import InboundAccount, InboundBudget
from iii.log import SNIPPET_CHARS, bounded_repr, truncate
from iii.modules.conditions import condition_passes
from iii.modules.rest_api.bodies import (
    FREE_BYTES,
    RETRY_AFTER,
    BodyTimeoutError,
    NoRoomError,
    read_body,
)
from iii.modules.rest_api.cors import CorsPolicy
from iii.modules.rest_api.exchange import Exchange
from iii.modules.rest_api.protocol import (
    BodyTooLargeError,
    HttpRequest,
    Responder,
    new_error_id,
)
from iii.modules.rest_api.routes import RouteMatch, RouteTable
from iii.modules.rest_api.side_tasks import SideTasks

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["RestDispatcher", "build_payload", "parse_headers"]

log = logging.getLogger(__name__)

JSON = (b"content-type", b"application/json")
_ANSWERED = object()  # a request answered already (an error)
# Hop-by-hop and framing headers a function may not set: the server frames.
_DROPPED_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"})


def parse_headers(value: Any) -> list[tuple[bytes, bytes]]:
    """Response headers given as ``{"Name": "value"}`` or ``["Name: value", ...]``."""
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(item, list):
                pairs.extend((str(name), _header_text(v)) for v in item)
            elif item is not None:
                pairs.append((str(name), _header_text(item)))
    elif isinstance(value, list):
        for line in value:
            if isinstance(line, str) and ":" in line:
                name, _, text = line.partition(":")
                pairs.append((name.strip(), text.strip()))
            else:
                raise ValueError(f"header {bounded_repr(line)} is not a 'Name: value' string")
    elif value is not None:
        raise ValueError(f"headers must be a map or a list, not {type(value).__name__}")
    return [(name.lower().encode("latin-1"), text.encode("utf-8")) for name, text in pairs]


def _header_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _merge_headers(
    current: list[tuple[bytes, bytes]], new: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """``set_headers``: the names given replace earlier values of those names."""
    replaced = {name for name, _ in new}
    return [(n, v) for n, v in current if n not in replaced] + new


def _request_header(request: HttpRequest, name: bytes) -> str | None:
    value = request.header(name)
    return value.decode("latin-1") if value is not None else None


def build_payload(request: HttpRequest, match: RouteMatch, body: Any) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for name, value in request.headers:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        headers[name.decode("latin-1")] = text
    route = match.route
    return {
        "query_params": dict(parse_qsl(request.query, keep_blank_values=True))
        if request.query
        else {},
        "path_params": match.path_params,
        "headers": headers,
        "path": route.pattern.raw,
        "method": request.method,
        "body": body,
        "trigger": {"type": "http", "path": route.pattern.raw, "method": route.method},
    }


class RestDispatcher:
    """The application the REST port's :class:`HttpServer` runs."""

    def __init__(
        self,
        engine: Engine,
        routes: RouteTable,
        *,
        timeout: float,
        concurrency_limit: int,
        max_body_size: int,
        max_body_bytes_in_flight: int,
        cors: CorsPolicy,
    ):
        self.engine = engine
        self.routes = routes
        self.timeout = timeout
        self.limiter = trio.Semaphore(max(1, concurrency_limit))
        self.max_body_size = max_body_size
        # JSON bodies held at once (iii.modules.rest_api.bodies).
        self.bodies = InboundBudget(limit=max_body_bytes_in_flight, slack=max_body_size)
        self.bodies_refused = 0  # answered 503: no room before their deadline
        self.cors = cors
        self._side_tasks_nursery: trio.Nursery | None = None  # while run() runs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the requests' side tasks (:mod:`.side_tasks`) until cancelled.

        Requests are served only while this runs: their channel work starts
        here, in a nursery of the dispatcher's own, not in the server's."""
        async with trio.open_nursery() as side_tasks_nursery:
            self._side_tasks_nursery = side_tasks_nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._side_tasks_nursery = None

    def _side_nursery(self) -> trio.Nursery:
        if self._side_tasks_nursery is None:
            raise RuntimeError("RestDispatcher.run() is not running")
        return self._side_tasks_nursery

    async def __call__(self, request: HttpRequest, responder: Responder) -> None:
        origin = request.header(b"origin")
        if origin is not None:
            wanted = request.header(b"access-control-request-method")
            if request.method == "OPTIONS" and wanted is not None:
                await self._preflight(request, responder, origin, wanted)
                return
            responder.extra_headers.extend(self.cors.response_headers(origin))
        matches = self.routes.match(request.path)
        match = matches.get(request.method)
        if match is None and request.method == "HEAD":
            match = matches.get("GET")
        if match is not None:
            if self.engine.tracer.enabled:
                await self._call_route_traced(request, responder, match)
            else:
                await self._call_route(request, responder, match)
        elif matches:
            allow = ", ".join(sorted(matches)).encode()
            responder.extra_headers.append((b"allow", allow))
            await responder.respond_error(
                405, "METHOD_NOT_ALLOWED", f"{request.method} is not allowed on {request.path}"
            )
        else:
            await responder.respond_error(
                404, "NOT_FOUND", f"no route for {request.method} {request.path}"
            )

    async def _preflight(
        self, request: HttpRequest, responder: Responder, origin: bytes, wanted: bytes
    ) -> None:
        verdict = self.cors.preflight(
            origin, wanted, request.header(b"access-control-request-headers")
        )
        if not verdict.allowed:
            await responder.respond_error(403, "CORS_FORBIDDEN", verdict.reason)
            return
        await responder.respond(200, [*verdict.headers, (b"content-type", b"text/plain")])

    # -- a routed request ----------------------------------------------------

    async def _call_route_traced(
        self, request: HttpRequest, responder: Responder, match: RouteMatch
    ) -> None:
        """A routed request under a ``server`` span (tracing on): child of the
        client's ``traceparent`` header, parent of the function's call."""
        route = match.route
        with self.engine.tracer.span(
            f"{request.method} {route.pattern.raw}",
            kind="server",
            traceparent=_request_header(request, b"traceparent"),
            baggage=_request_header(request, b"baggage"),
            attributes={
                "http.request.method": request.method,
                "http.route": route.pattern.raw,
                "url.path": request.path,
                "iii.function.id": route.function_id,
            },
        ) as span:
            await self._call_route(request, responder, match, span.traceparent, span.baggage)
            span.set_attribute("http.response.status_code", responder.status)
            if responder.status >= 500:
                span.set_error(f"HTTP_{responder.status}")

    async def _call_route(
        self,
        request: HttpRequest,
        responder: Responder,
        match: RouteMatch,
        traceparent: str | None = None,
        baggage: str | None = None,
    ) -> None:
        length = request.content_length
        if length is not None and length > self.max_body_size:
            await responder.respond_error(
                413, "PAYLOAD_TOO_LARGE", f"request body larger than {self.max_body_size} bytes"
            )
            return
        # The request's deadline bounds everything up to the response head.
        # It is not a cancel scope around the request (8 us each; this is
        # the hot path of bench/bench_rest.py): each wait takes its share,
        # and the call's own deadline is the engine's (iii.invocations).
        deadline = trio.current_time() + self.timeout
        with self.engine.track_call():
            if not await self._take_slot(deadline):
                await self._timeout_response(responder, match.route.function_id)
                return
            try:
                await self._exchange(request, responder, match, deadline, traceparent, baggage)
            finally:
                self.limiter.release()

    async def _take_slot(self, deadline: float) -> bool:
        """A ``concurrency_request_limit`` slot; False if none came free in time."""
        try:
            self.limiter.acquire_nowait()  # a free slot: no trip through the scheduler
            return True
        except trio.WouldBlock:
            pass
        with trio.move_on_at(deadline):
            await self.limiter.acquire()  # beyond the limit: wait
            return True
        return False

    async def _timeout_response(self, responder: Responder, function_id: str) -> None:
        await responder.respond_error(
            504, "TIMEOUT", f"{function_id} gave no response within {self.timeout:g}s"
        )

    async def _exchange(
        self,
        request: HttpRequest,
        responder: Responder,
        match: RouteMatch,
        deadline: float,
        traceparent: str | None = None,
        baggage: str | None = None,
    ) -> None:
        content_type = (request.header(b"content-type") or b"").lower()
        if b"application/json" not in content_type:
            await self._call(request, responder, match, None, False, deadline, traceparent, baggage)
            return
        # The body's bytes count in max_body_bytes_in_flight until the request ends.
        account = InboundAccount(budget=self.bodies, allowance=FREE_BYTES)
        try:
            body = await self._json_body(request, responder, match, account, deadline)
            if body is not _ANSWERED:
                await self._call(
                    request, responder, match, body, True, deadline, traceparent, baggage
                )
        finally:
            account.close()

    async def _json_body(
        self,
        request: HttpRequest,
        responder: Responder,
        match: RouteMatch,
        account: InboundAccount,
        deadline: float,
    ) -> Any:
        """The parsed body (None if empty or not JSON), or _ANSWERED with an error sent."""
        try:
            raw = await read_body(request, account, limit=self.max_body_size, deadline=deadline)
        except BodyTooLargeError as exc:
            await responder.respond_error(413, "PAYLOAD_TOO_LARGE", str(exc))
            return _ANSWERED
        except NoRoomError:
            self.bodies_refused += 1
            responder.extra_headers.append((b"retry-after", RETRY_AFTER))
            await responder.respond_error(
                503,
                "SERVER_BUSY",
                "the server holds as many request bodies as it may "
                "(max_body_bytes_in_flight): try again later",
            )
            return _ANSWERED
        except BodyTimeoutError:
            await self._timeout_response(responder, match.route.function_id)
            return _ANSWERED
        try:
            return json_limits.loads(raw) if raw else None
        except json_limits.JsonTooDeepError as exc:
            await responder.respond_error(400, "BAD_REQUEST", f"request body {exc.reason}")
            return _ANSWERED
        except orjson.JSONDecodeError:
            return None

    async def _call(
        self,
        request: HttpRequest,
        responder: Responder,
        match: RouteMatch,
        body: Any,
        is_json: bool,
        deadline: float,
        traceparent: str | None,
        baggage: str | None,
    ) -> None:
        """Call the route's function (its condition first) with the request's payload."""
        route = match.route
        payload = build_payload(request, match, body)
        # The calls are made for the route's registrants, under their grant.
        grant = getattr(route.key, "grant", None)
        if route.condition_function_id is not None:
            if not await self._condition_met(
                responder,
                route.condition_function_id,
                payload,
                deadline,
                traceparent,
                baggage,
                grant=grant,
            ):
                return
        channels = self.engine.channels
        request_channel = channels.create()
        response_channel = channels.create()
        # The engine's ends are reserved, not opened: they are opened (and a
        # task started) only if the function opens the other end.
        request_channel.reserve("write")
        response_channel.reserve("read")
        try:
            payload["request_body"] = request_channel.ref("read")
            payload["response"] = response_channel.ref("write")
            exchange = Exchange(
                dispatcher=self,
                request=request,
                responder=responder,
                function_id=route.function_id,
                grant=grant,
                invocation_id=random_uuid(),
                deadline=deadline,
                side=SideTasks(self._side_nursery()),
                request_channel=request_channel,
                response_channel=response_channel,
                body_streamed=not is_json and request.has_body,
            )
            exchange.attach()
            try:
                await exchange.call(payload, traceparent, baggage)
            except BaseException:
                exchange.stop()  # cancelled or failed: the side tasks go with it
                raise
            finally:
                exchange.detach()
                await exchange.side.join()
            if exchange.client_gone is not None:
                raise exchange.client_gone
        finally:
            channels.remove(request_channel)
            channels.remove(response_channel)

    async def _condition_met(
        self,
        responder: Responder,
        condition_id: str,
        payload: Any,
        deadline: float,
        traceparent: str | None = None,
        baggage: str | None = None,
        *,
        grant: Grant | None = None,
    ) -> bool:
        try:
            passes = await condition_passes(
                self.engine,
                condition_id,
                dict(payload),
                null_passes=True,
                what="http",
                timeout=max(0.0, deadline - trio.current_time()),
                traceparent=traceparent,
                baggage=baggage,
                grant=grant,
            )
        except IIIError as exc:
            await self._error_response(responder, exc, condition_id)
            return False
        if not passes:
            await responder.respond_error(
                422, "CONDITION_NOT_MET", "Request condition not met", skipped=True
            )
        return passes

    def _control(
        self,
        function_id: str,
        text: str,
        status: int,
        headers: list[tuple[bytes, bytes]],
        started: bool,
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            log.warning("%s: response channel text frame is not JSON: ignored", function_id)
            return status, headers
        kind = message.get("type") if isinstance(message, dict) else None
        if started:
            log.warning(
                "%s: %s after the response head was sent: ignored", function_id, bounded_repr(kind)
            )
            return status, headers
        if kind == "set_status":
            code = message.get("status_code")
            if isinstance(code, int) and not isinstance(code, bool) and 200 <= code <= 599:
                return code, headers
            log.warning("%s: set_status %s ignored (200-599 only)", function_id, bounded_repr(code))
        elif kind == "set_headers":
            try:
                new = parse_headers(message.get("headers"))
            except ValueError as exc:
                log.warning("%s: set_headers ignored: %s", function_id, exc)
                return status, headers
            return status, _merge_headers(headers, [h for h in new if h[0] not in _DROPPED_HEADERS])
        else:
            log.warning(
                "%s: unknown response control message %s ignored", function_id, bounded_repr(kind)
            )
        return status, headers

    async def _simple_response(self, responder: Responder, function_id: str, result: Any) -> None:
        if not isinstance(result, dict):
            await self._internal_error(
                responder, function_id, f"returned {type(result).__name__}, not an object"
            )
            return
        status = result.get("status_code", result.get("statusCode", 200))
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            await self._internal_error(
                responder, function_id, f"invalid status_code {bounded_repr(status)}"
            )
            return
        body = result.get("body")
        try:
            encoded = orjson.dumps({} if body is None else body)
            headers = [
                h
                for h in parse_headers(result.get("headers"))
                if h[0] not in _DROPPED_HEADERS and h[0] != b"content-length"
            ]
        except (TypeError, ValueError) as exc:
            problem = truncate(str(exc), SNIPPET_CHARS)
            await self._internal_error(responder, function_id, f"invalid response: {problem}")
            return
        if not any(name == b"content-type" for name, _ in headers):
            headers.insert(0, JSON)
        try:
            await responder.respond(status, headers, encoded)
        except h11.LocalProtocolError as exc:
            problem = truncate(str(exc), SNIPPET_CHARS)  # h11 quotes the header whole
            await self._internal_error(
                responder, function_id, f"invalid response headers: {problem}"
            )

    async def _error_response(self, responder: Responder, exc: IIIError, function_id: str) -> None:
        if exc.code == "timeout":
            await responder.respond_error(
                504, "TIMEOUT", f"{function_id} gave no response within {self.timeout:g}s"
            )
        elif exc.code == "payload_too_large":
            # The request does not fit in one message to that worker (0.4.1
            # workers take at most 1 MiB): a large body must be streamed.
            await responder.respond_error(413, "PAYLOAD_TOO_LARGE", exc.message)
        elif exc.code == "function_not_found":
            await responder.respond_error(
                404, "FUNCTION_NOT_FOUND", f"function {function_id} not found"
            )
        else:
            await self._internal_error(responder, function_id, f"{exc.code}: {exc.message}")

    async def _internal_error(self, responder: Responder, function_id: str, detail: str) -> None:
        error_id = new_error_id()
        log.warning("%s: 500 (error_id %s): %s", function_id, error_id, detail)
        await responder.respond_error(
            500, "INTERNAL_ERROR", "internal server error", error_id=error_id
        )
