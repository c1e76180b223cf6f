"""The REST API module (``modules::api::RestApiModule``): HTTP triggers on port 3111.

Provides the ``http`` trigger type.  A trigger config
``{"api_path": "/todo/:id", "http_method": "GET", "_condition_path"?: fn}``
(``condition_function_id`` is accepted as well; the method in any case) adds
a route while the engine serves, and removing the trigger removes it at once:
the next request gets 404 (spec modules.md §1, protocol.md §5.2).  A route of
another function with the same method and path shape is refused with a
``TriggerRegistrationError``, which the registering worker receives as a
``triggerregistrationresult`` error.  The port has no built-in route: ``GET
/health`` answers 404 until a worker registers it, as upstream's does (the
official 0.25 SDK suite checks it); the engine's own liveness and readiness
are ``/healthz`` and ``/readyz`` on the metrics port (observability module).

Files: :mod:`.routes` (the route table), :mod:`.server` (HTTP/1.1 on h11 and
trio), :mod:`.dispatch` (request -> function call -> answer), :mod:`.exchange`
(a request while its function runs), :mod:`.bodies` (JSON bodies within
``max_body_bytes_in_flight``), :mod:`.cors`.

Lifetime: :meth:`Module.run` registers the trigger type, starts the server in
the module's own nursery and reports ready once the port is bound
(``module.port`` is the bound port, useful with ``port: 0``).  When the engine
sets ``shutting_down`` the server stops accepting, closes idle connections and
lets requests in flight finish (they count in ``engine.inflight``, which the
engine's shutdown grace waits for); the engine cancels the rest after the grace.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from iii.admission import Admission, ConnectionLimits
from iii.config_schema import Count, FieldValueError
from iii.errors import TriggerRegistrationError
from iii.grants import TriggerAccess
from iii.inbound import InboundBudget
from iii.log import bounded_repr
from iii.modules import ModuleStatistics
from iii.modules.conditions import CONDITION_KEYS, condition_of
from iii.modules.rest_api.cors import CorsPolicy
from iii.modules.rest_api.dispatch import RestDispatcher
from iii.modules.rest_api.routes import (
    METHODS,
    Route,
    RouteConflictError,
    RoutePatternError,
    RouteTable,
    parse_pattern,
)
from iii.modules.rest_api.server import HttpServer
from iii.registry import LogicalTrigger
from iii.security import server_ssl_context

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "CorsConfig", "Module", "HttpTriggers", "route_for_trigger"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
HTTP_TRIGGER_ACCESS = TriggerAccess(function_keys=CONDITION_KEYS)


@attrs.frozen(kw_only=True)
class CorsConfig:
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ()


def _holds_a_body(config: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if value < config.max_body_size:
        raise FieldValueError(
            attribute.name,
            f"must be at least max_body_size ({config.max_body_size}), got {value}",
        )


@attrs.frozen(kw_only=True)
class Config:
    port: int = 3111
    host: str = "0.0.0.0"
    # Milliseconds, under upstream's key name (no ``_ms`` suffix upstream).
    default_timeout: int = 30_000
    concurrency_request_limit: int = 1024
    cors: CorsConfig | None = None
    # Ours (upstream has no limit): a larger request body gets 413.
    max_body_size: int = 64 * MiB
    # Ours: bytes of JSON request bodies held at once past each request's
    # first 64 KiB; a body finds no room -> not read; none until its deadline
    # -> 503 with Retry-After (see .bodies).  At least max_body_size.
    max_body_bytes_in_flight: int = attrs.field(default=256 * MiB, validator=_holds_a_body)
    # Ours: sockets open at once, in all and from one peer address (an IPv6
    # address counts by its /64), counted from accept; more get 503 at once.
    max_connections: Count = Count(4096)
    max_connections_per_address: Count = Count(256)

    @property
    def timeout(self) -> float:
        return self.default_timeout / 1000


def route_for_trigger(trigger: LogicalTrigger) -> Route:
    """Validate an ``http`` trigger config; raises :class:`TriggerRegistrationError`."""
    config = trigger.config
    if not isinstance(config, dict):
        raise TriggerRegistrationError("http trigger config must be an object with api_path")
    api_path = config.get("api_path")
    if not isinstance(api_path, str) or not api_path.strip():
        raise TriggerRegistrationError("http trigger config needs api_path (a non-empty string)")
    method = config.get("http_method")
    if method is None:
        method = "GET"
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise TriggerRegistrationError(
            f"http_method {bounded_repr(method)} is not supported (one of {', '.join(METHODS)})"
        )
    condition = condition_of(config, "http")
    try:
        pattern = parse_pattern(api_path)
    except RoutePatternError as exc:
        raise TriggerRegistrationError(str(exc)) from None
    return Route(
        method=method.upper(),
        pattern=pattern,
        function_id=trigger.function_id,
        condition_function_id=condition,
        key=trigger,
    )


class HttpTriggers:
    """The ``http`` trigger type: keeps the route table in step with the triggers."""

    def __init__(self, routes: RouteTable):
        self.routes = routes

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        route = route_for_trigger(trigger)
        try:
            self.routes.add(route)
        except RouteConflictError as exc:
            raise TriggerRegistrationError(str(exc)) from None
        log.info("route %s %s -> %s", route.method, route.pattern.raw, route.function_id)

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        route = self.routes.remove(trigger)
        if route is not None:
            log.info("route %s %s removed", route.method, route.pattern.raw)


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.routes = RouteTable()
        self.triggers = HttpTriggers(self.routes)
        cors = config.cors
        self.dispatcher = RestDispatcher(
            engine,
            self.routes,
            timeout=config.timeout,
            concurrency_limit=config.concurrency_request_limit,
            max_body_size=config.max_body_size,
            max_body_bytes_in_flight=config.max_body_bytes_in_flight,
            cors=CorsPolicy()
            if cors is None
            else CorsPolicy.from_lists(cors.allowed_origins, cors.allowed_methods),
        )
        self.server = HttpServer(
            self.dispatcher,
            admission=Admission(
                ConnectionLimits(
                    max_connections=config.max_connections,
                    max_per_address=config.max_connections_per_address,
                )
            ),
        )

    @property
    def port(self) -> int | None:
        """The bound port once started."""
        return self.server.port

    @property
    def bodies(self) -> InboundBudget:
        """The bytes of JSON request bodies held now (``max_body_bytes_in_flight``)."""
        return self.dispatcher.bodies

    def statistics(self) -> ModuleStatistics:
        """``iii_module_rest_api_*`` on /metrics."""
        bodies = self.dispatcher.bodies.statistics()
        return ModuleStatistics(
            values={
                # bytes of JSON bodies held now (max_body_bytes_in_flight), and the most
                "body_bytes": bodies.used,
                "body_bytes_peak": bodies.peak,
                "bodies_waiting": bodies.waiting,  # requests whose body waits for room now
                "bodies_refused": self.dispatcher.bodies_refused,  # 503: no room in time
                "connections": self.server.connections,  # sockets open now
                "connections_refused": self.server.refused,  # refused on accept (503)
            }
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.engine.register_trigger_type(
            "http",
            self.triggers,
            description="HTTP routes on the REST API port",
            access=HTTP_TRIGGER_ACCESS,
        )
        async with trio.open_nursery() as module_nursery:
            await module_nursery.start(self.dispatcher.run)
            await module_nursery.start(
                partial(
                    self.server.serve,
                    self.config.host,
                    self.config.port,
                    ssl_context=server_ssl_context(self.engine.config.tls),
                    what="REST API",
                    keys=self.engine.config.listen_keys(self.config),
                )
            )
            module_nursery.start_soon(self._drain_on_shutdown)
            log.info(
                "REST API listening on %s://%s:%d",
                "https" if self.engine.config.tls.enabled else "http",
                self.config.host,
                self.port,
            )
            task_status.started()

    async def _drain_on_shutdown(self) -> None:
        await self.engine.shutting_down.wait()
        log.debug("REST API draining: %d requests in flight", self.server.active_requests)
        self.server.begin_drain()
