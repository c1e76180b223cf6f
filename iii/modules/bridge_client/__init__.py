"""BridgeClient: ``modules::bridge_client::BridgeClientModule`` uses another iii engine.

This engine connects to the remote engine's worker port as a worker, over
one supervised :class:`~iii.link.EngineLink` per entry.  Config (upstream's
keys first, then ours; unknown keys are an error)::

    - class: modules::bridge_client::BridgeClientModule
      config:
        url: ws://backend:49134        # default $III_URL, else ws://0.0.0.0:49134 (upstream)
        service_id: billing-bridge     # registered on the remote (registerservice)
        service_name: Billing bridge   # default: service_id
        expose:                        # local functions the remote may call
          - local_function: billing::quote
            remote_function: edge::quote   # default: local_function
        forward:                       # local aliases of remote functions
          - local_function: remote::state::get
            remote_function: state::get
            timeout_ms: 5000           # default 30000
        # ours:
        name: backend                  # the entry's name (default: service_id, else host:port)
        token_env: BACKEND_TOKEN       # env var with the bearer token for the remote's auth.tokens
        ca_file: /etc/iii/backend-ca.pem   # CAs for a wss:// url (default: the system store)
        grant: edge                    # run the remote's calls with this local auth token's grant
        connect_timeout_ms: 10000
        backoff_initial_ms: 500
        backoff_max_ms: 30000
        max_concurrent_calls: 256      # calls from the remote running at once

Functions (upstream's ids and shapes):

* ``bridge.invoke {function_id, data?, timeout_ms?}``: the remote function's
  result, as it is (default timeout 30 s);
* ``bridge.invoke_async {function_id, data?}``: fire-and-forget, no result;
* each ``forward`` entry's ``local_function``: its input goes to the remote's
  ``remote_function``, its result comes back.

A bad input is ``deserialization_error``.  While the link is down these fail
at once with ``bridge_unavailable``; a call in flight when it drops ends
``invocation_stopped``; the remote's own error comes back with the remote's
code (upstream wraps every failure as ``bridge_error``; here the code says
what happened).  With ``auth.tokens`` on this engine, a worker may reach a
remote function through ``bridge.invoke`` only if its token may invoke that
function id (the same patterns as for local calls).

``expose``: each local function is registered on the remote under
``remote_function``.  A call from the remote is routed here through
:meth:`Engine.invoke` like any other call (worker replicas, engine
functions, HTTP functions); ``_caller_worker_id`` (a remote worker's id) is
taken out of its input.  With ``grant``, the call runs with that token's
grant: the exposed function and every call it makes for the remote are
checked against it (a name no token has allows nothing).  Without it, the
``expose`` list is the boundary.

Trace context crosses in both directions: a forwarded call carries the
context of its invocation span, and a call from the remote runs under a span
that is a child of the remote's, so one request is one trace id in both
engines.

Several entries are allowed, one per remote (:attr:`ModuleSpec.repeatable`);
each is named (``name``, else ``service_id``, else ``host:port``, made
unique with ``-2`` …).  ``bridge.invoke`` / ``bridge.invoke_async`` belong
to the first entry; the input key ``bridge: <name>`` picks another one.
Forwarded ``local_function`` ids must be unique across entries.

Lifetime: :meth:`Module.run` registers the functions, then runs the link in
the module's nursery until the engine stops; the link reconnects on its own.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from iii.client import UsageError
from iii.config_schema import FieldValueError
from iii.errors import ConfigError, DeserializationError, IIIError
from iii.grants import Grant
from iii.link import EngineLink, ExposedHandler, LinkConfig, LinkStatistics, TraceContext
from iii.modules import ModuleStatistics
from iii.modules.instances import unique_names
from iii.native import CallContext, NativeHandler

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = [
    "Config",
    "ExposeEntry",
    "ForwardEntry",
    "Module",
    "name_instances",
    "INVOKE_FUNCTION",
    "INVOKE_ASYNC_FUNCTION",
    "DEFAULT_URL",
]

log = logging.getLogger(__name__)

INVOKE_FUNCTION: Final = "bridge.invoke"
INVOKE_ASYNC_FUNCTION: Final = "bridge.invoke_async"
DEFAULT_URL: Final = "ws://0.0.0.0:49134"
DEFAULT_TIMEOUT_MS: Final = 30_000
WORKER_NAME: Final = "iii-bridge-client"


def _id(value: str, key: str) -> None:
    if not value.strip():
        raise FieldValueError(key, "must not be empty")


@attrs.frozen(kw_only=True)
class ExposeEntry:
    local_function: str
    remote_function: str | None = None

    @property
    def remote_id(self) -> str:
        return self.remote_function or self.local_function


@attrs.frozen(kw_only=True)
class ForwardEntry:
    local_function: str
    remote_function: str
    timeout_ms: int | None = None


@attrs.frozen(kw_only=True)
class Config:
    url: str | None = None
    service_id: str | None = None
    service_name: str | None = None
    expose: tuple[ExposeEntry, ...] = ()
    forward: tuple[ForwardEntry, ...] = ()
    # Ours.
    name: str = ""
    token_env: str | None = None
    ca_file: str | None = None
    grant: str | None = None
    connect_timeout_ms: int = 10_000
    backoff_initial_ms: int = 500
    backoff_max_ms: int = 30_000
    max_concurrent_calls: int = 256

    def __attrs_post_init__(self) -> None:
        self.effective_url()  # a bad URL (or $III_URL) is a config error
        for index, expose in enumerate(self.expose):
            _id(expose.local_function, f"expose[{index}].local_function")
            if expose.remote_function is not None:
                _id(expose.remote_function, f"expose[{index}].remote_function")
        remote_ids: dict[str, int] = {}
        for index, expose in enumerate(self.expose):
            if expose.remote_id in remote_ids:
                raise FieldValueError(
                    f"expose[{index}]",
                    f"{expose.remote_id!r} is exposed twice"
                    f" (also expose[{remote_ids[expose.remote_id]}])",
                )
            remote_ids[expose.remote_id] = index
        local_ids: dict[str, int] = {}
        for index, forward in enumerate(self.forward):
            _id(forward.local_function, f"forward[{index}].local_function")
            _id(forward.remote_function, f"forward[{index}].remote_function")
            if forward.timeout_ms is not None and forward.timeout_ms < 1:
                raise FieldValueError(f"forward[{index}].timeout_ms", "must be at least 1")
            if forward.local_function in (INVOKE_FUNCTION, INVOKE_ASYNC_FUNCTION):
                raise FieldValueError(
                    f"forward[{index}].local_function",
                    f"{forward.local_function} is the module's own",
                )
            if forward.local_function in local_ids:
                raise FieldValueError(
                    f"forward[{index}].local_function",
                    f"{forward.local_function!r} is forwarded"
                    f" twice (also forward[{local_ids[forward.local_function]}])",
                )
            local_ids[forward.local_function] = index
        if self.service_id is not None:
            _id(self.service_id, "service_id")
        if self.token_env is not None and not os.environ.get(self.token_env):
            raise FieldValueError(
                "token_env", f"the environment variable {self.token_env} is not set"
            )
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise FieldValueError("ca_file", f"{self.ca_file} is not a readable file")
        for key in ("connect_timeout_ms", "backoff_initial_ms", "max_concurrent_calls"):
            if getattr(self, key) < 1:
                raise FieldValueError(key, "must be at least 1")
        if self.backoff_max_ms < self.backoff_initial_ms:
            raise FieldValueError("backoff_max_ms", "must be at least backoff_initial_ms")

    def effective_url(self) -> str:
        url = self.url or os.environ.get("III_URL") or DEFAULT_URL
        try:
            LinkConfig(url=url).endpoint()
        except UsageError as exc:
            from_env = not self.url and bool(os.environ.get("III_URL"))
            reason = f"{exc.message} (from $III_URL)" if from_env else exc.message
            raise FieldValueError("url", reason) from None
        return url

    def link_config(self) -> LinkConfig:
        return LinkConfig(
            url=self.effective_url(),
            name=self.service_name or self.service_id or WORKER_NAME,
            description=f"iii bridge client {self.name}".strip(),
            token=os.environ.get(self.token_env) if self.token_env else None,
            ca_file=self.ca_file,
            connect_timeout_s=self.connect_timeout_ms / 1000,
            backoff_initial_s=self.backoff_initial_ms / 1000,
            backoff_max_s=self.backoff_max_ms / 1000,
            max_concurrent_calls=self.max_concurrent_calls,
        )


def _default_name(config: Config) -> str:
    if config.service_id:
        return config.service_id
    endpoint = LinkConfig(url=config.effective_url()).endpoint()
    return f"{endpoint.host}:{endpoint.port}"


def name_instances(configs: list[Config], *, file: str | None, keys: list[str]) -> list[Config]:
    """Name every entry uniquely; forwarded local ids must be unique across entries."""
    named = unique_names(
        configs, what="bridge clients", default_name=_default_name, file=file, keys=keys
    )
    forwarded: dict[str, str] = {}
    for index, config in enumerate(named):
        for position, forward in enumerate(config.forward):
            key = f"{keys[index]}.forward[{position}].local_function"
            if forward.local_function in forwarded:
                raise ConfigError(
                    f"{forward.local_function!r} is forwarded by two bridge clients"
                    f" (also {forwarded[forward.local_function]})",
                    file=file,
                    key=key,
                )
            forwarded[forward.local_function] = key
    return named


@attrs.frozen(kw_only=True)
class _InvokeInput:
    function_id: str
    data: Any = None
    timeout_ms: int | None = None
    bridge: str | None = None


def _parse_invoke(data: Any) -> _InvokeInput:
    if not isinstance(data, dict):
        raise DeserializationError(
            f"Failed to parse invoke input: expected an object, got"
            f" {'null' if data is None else type(data).__name__}"
        )
    target = data.get("function_id")
    if not isinstance(target, str) or not target:
        raise DeserializationError("Failed to parse invoke input: missing field `function_id`")
    timeout_ms = data.get("timeout_ms")
    if timeout_ms is not None and (
        isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 0
    ):
        raise DeserializationError(
            "Failed to parse invoke input: timeout_ms must be a non-negative integer"
        )
    bridge = data.get("bridge")
    if bridge is not None and not isinstance(bridge, str):
        raise DeserializationError("Failed to parse invoke input: bridge must be a string")
    return _InvokeInput(
        function_id=target, data=data.get("data"), timeout_ms=timeout_ms, bridge=bridge
    )


def _trace(ctx: CallContext) -> TraceContext:
    return TraceContext(traceparent=ctx.traceparent, baggage=ctx.baggage)


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.link = EngineLink(config.link_config())
        self.grant: Grant | None = None
        if config.grant is not None:
            self.grant = engine.authenticator.grant_named(config.grant)
            labels = {token.label for token in engine.config.auth.tokens}
            if self.grant is None:
                log.warning(
                    "bridge client %s: grant %r is ignored: this engine has no auth.tokens",
                    config.name,
                    config.grant,
                )
            elif config.grant not in labels:
                log.error(
                    "bridge client %s: no auth token is named %r: calls from the remote"
                    " are all refused",
                    config.name,
                    config.grant,
                )

    def link_statistics(self) -> LinkStatistics:
        # Not ``statistics()``: the observability module would make metric
        # names of it with the entry's name, which may hold '.', ':' or '-'.
        return self.link.statistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        engine = self.engine
        if INVOKE_FUNCTION not in engine.registry.functions:
            # One pair for every entry: the first one registers them.
            engine.register_function(
                INVOKE_FUNCTION,
                self._invoke,
                description="Invoke a function on the remote III instance",
            )
            engine.register_function(
                INVOKE_ASYNC_FUNCTION,
                self._invoke_async,
                description="Fire-and-forget invoke on the remote III instance",
            )
        for forward in self.config.forward:
            engine.register_function(
                forward.local_function,
                self._forwarder(forward),
                description=f"Forward to remote function {forward.remote_function}",
            )
        for expose in self.config.expose:
            self.link.expose(expose.remote_id, self._exposed(expose.local_function))
        if self.config.service_id:
            self.link.register_service(
                self.config.service_id, name=self.config.service_name or self.config.service_id
            )
        log.info(
            "bridge client %s: linking to %s (%d exposed, %d forwarded)",
            self.config.name,
            self.link.url,
            len(self.config.expose),
            len(self.config.forward),
        )
        async with trio.open_nursery() as module_nursery:
            await module_nursery.start(self.link.run)
            task_status.started()

    # -- this engine -> the remote -----------------------------------------------------------

    def _bridge_for(self, name: str | None) -> Module:
        if name is None or name == self.config.name:
            return self
        for module in self.engine.modules.values():
            if isinstance(module, Module) and module.config.name == name:
                return module
        raise IIIError(f"no bridge client is named {name!r}", code="bridge_not_found")

    async def _invoke(self, data: Any, ctx: CallContext) -> Any:
        request = _parse_invoke(data)
        if ctx.grant is not None:
            ctx.grant.require_invoke(request.function_id)
        bridge = self._bridge_for(request.bridge)
        timeout_ms = request.timeout_ms if request.timeout_ms is not None else DEFAULT_TIMEOUT_MS
        return await bridge.link.call(
            request.function_id, request.data, timeout_s=timeout_ms / 1000, trace=_trace(ctx)
        )

    async def _invoke_async(self, data: Any, ctx: CallContext) -> Any:
        request = _parse_invoke(data)
        if ctx.grant is not None:
            ctx.grant.require_invoke(request.function_id)
        bridge = self._bridge_for(request.bridge)
        await bridge.link.call_void(request.function_id, request.data, trace=_trace(ctx))
        return None

    def _forwarder(self, forward: ForwardEntry) -> NativeHandler:
        timeout_s = (forward.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        remote_function = forward.remote_function

        async def forward_call(data: Any, ctx: CallContext) -> Any:
            return await self.link.call(
                remote_function, data, timeout_s=timeout_s, trace=_trace(ctx)
            )

        return forward_call

    # -- the remote -> this engine ---------------------------------------------------------------

    def _exposed(self, local_function: str) -> ExposedHandler:
        async def exposed_call(data: Any, trace: TraceContext) -> Any:
            if isinstance(data, dict):
                data.pop("_caller_worker_id", None)  # a remote worker's id means nothing here
            return await self.engine.invoke(
                local_function,
                data,
                traceparent=trace.traceparent,
                baggage=trace.baggage,
                grant=self.grant,
            )

        return exposed_call

    def statistics(self) -> ModuleStatistics:
        """Nothing module-wide: each link's numbers are :meth:`link_statistics`."""
        return ModuleStatistics()  # nothing to report
