"""Loading the engine config: ``config.yaml`` (or ``.toml``) into a frozen attrs tree.

The file has upstream's shape (spec modules.md §0.1)::

    port: 49134
    modules:
      - class: modules::api::RestApiModule
        config: {port: 3111}

plus a few engine keys of our own (``host``, ``invocation_timeout_ms`` …, see
:class:`EngineConfig`).  Keys the Rust engine gives in milliseconds keep their
``_ms`` name in the file; code reads seconds through the properties.

Improvements over upstream, each a :class:`~iii.errors.ConfigError` naming the
file, the key and the reason:

* ``${VAR}`` / ``${VAR:default}`` is expanded in string values *after* YAML
  parsing, so comments are never expanded and a value cannot inject YAML.  A
  value that is exactly one reference takes the type of what it expands to,
  by YAML 1.2 core rules (``port: ${PORT:49134}`` is an integer; ``yes`` or
  ``12:30`` stay strings, unlike PyYAML's YAML 1.1).  An unset variable without a
  default is an error naming the variable and the key.
* An unknown module class, an unknown key (top level or in a module's config)
  and a wrongly typed value are errors.
* A module listed twice is an error, except the exec module (one pipeline
  per entry, each named: see ``ModuleSpec.repeatable``).
* A hostile file (too large, a "billion laughs" of aliases, nesting past 64
  levels, a duplicate key) is refused by :mod:`iii.config_files`.

With no file, or a file without ``modules``, the default module set is used.
The mandatory modules (worker, telemetry) are added when missing.

Lifetime: loaded once, before the engine starts, into frozen values; nothing
here opens anything or runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NewType

import attrs
import cattrs
import tomli_w
import yaml
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from iii.config_files import read_config_file
from iii.errors import ConfigError
from iii.grants import parse_trigger_type_entry
from iii.modules import DEFAULT_MODULES, MODULE_SPECS

__all__ = [
    "AdapterRef",
    "AuthConfig",
    "AuthToken",
    "TlsConfig",
    "ClusterConfig",
    "EngineConfig",
    "ModuleEntry",
    "load_config",
    "read_config_tree",
    "parse_config",
    "default_config",
    "config_to_dict",
    "dump_config",
    "expand_env",
    "CONFIG_CONVERTER",
    "DEFAULT_PORT",
    "Count",
]

DEFAULT_PORT = 49134
MiB = 1024 * 1024

_ENV_REF = re.compile(r"\$\{([^}:]+)(?::([^}]*))?\}")


# An integer that must be at least 1 (a limit of 0 would refuse everything).
Count = NewType("Count", int)


@attrs.frozen(kw_only=True)
class AdapterRef:
    """A module's ``adapter: {class: <upstream adapter class>, config: {...}}`` block.

    ``config`` is kept as raw JSON: each backend validates its own keys.
    """

    class_name: str
    config: Any = None


@attrs.frozen(kw_only=True)
class ModuleEntry:
    class_name: str
    config: Any
    # Where the entry's config block is in the file ("modules[2].config"), for
    # messages; None for a module the file does not list (a default or
    # mandatory one).  Not part of the entry's value (equality).
    key: str | None = attrs.field(default=None, eq=False)


@attrs.frozen(kw_only=True)
class AuthToken:
    """One worker token and what it allows (``auth.tokens[]``).

    The secret is never written in the file: ``env`` names the environment
    variable that holds it, read when the config is loaded (unset, empty or
    shorter than 16 characters is a config error).  The lists are
    ``fnmatch``-style patterns (``billing::*``); each defaults to everything.
    A ``trigger_types`` entry may also be ``type(resource-pattern)``
    (``state(billing*)``): see :mod:`iii.grants` for what each list allows.
    Names (or, unnamed, ``env``) are unique: queued jobs record the name of
    the token that enqueued them.
    """

    name: str = ""
    env: str
    # Function ids this token's workers may register, and invoke (including
    # binding a trigger to them); trigger types they may bind or provide.
    register: tuple[str, ...] = ("*",)
    invoke: tuple[str, ...] = ("*",)
    trigger_types: tuple[str, ...] = ("*",)
    # Filled from ``env`` by the loader; never read from nor shown in a file.
    secret: str = attrs.field(default="", repr=False)

    @property
    def label(self) -> str:
        return self.name or self.env


@attrs.frozen(kw_only=True)
class AuthConfig:
    """``auth:``: with no tokens, any client that reaches the port may connect."""

    tokens: tuple[AuthToken, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


@attrs.frozen(kw_only=True)
class TlsConfig:
    """``tls:``: PEM certificate chain and key; both set = the worker port speaks ``wss://``."""

    cert: str | None = None
    key: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """``cluster:``: engines with the same ``name`` on one Redis act as one (:mod:`iii.cluster`).

    ``advertise`` is the ``ws://host:port`` peers use to reach this engine
    (default: the worker port on the bind address).  ``token_env`` names the
    environment variable holding the token peers present (at least 16
    characters, read when the config is loaded, like ``auth.tokens``).  An
    engine that stops heartbeating leaves every peer's view within
    ``dead_after_ms``.
    """

    name: str
    redis_url: str
    token_env: str
    advertise: str | None = None
    dead_after_ms: int = 3000
    # Filled from ``token_env`` by the loader; never read from nor shown in a file.
    secret: str = attrs.field(default="", repr=False)

    @property
    def dead_after(self) -> float:
        return self.dead_after_ms / 1000


# Integer engine keys and their allowed range (low, high or None); the
# ``Count`` keys (at least 1) are checked by their structure hook.
_ENGINE_RANGES: dict[str, tuple[int, int | None]] = {
    # In a file, 0 means the default port (upstream: replaced before this); in
    # code (iii.testing), an ephemeral one.
    "port": (0, 65535),
    "invocation_timeout_ms": (1, None),
    "heartbeat_interval_ms": (1, None),
    "heartbeat_timeout_ms": (1, None),
    "handshake_timeout_ms": (1, None),
    "shutdown_grace_ms": (0, None),
    "slow_consumer_timeout_ms": (1, None),
    "max_message_size": (1, None),
    "send_queue_size": (1, None),
    "max_pending_invocations": (1, None),
    "channel_buffer_bytes": (1, None),
    "channels_max_bytes": (1, None),
    "max_channels": (1, None),
    "max_inbound_bytes": (1, None),
    "inbound_wait_timeout_ms": (1, None),
}


@attrs.frozen(kw_only=True)
class EngineConfig:
    port: int = DEFAULT_PORT
    # Loopback by default: anyone who reaches the worker port can register
    # routes and call functions.  Set 0.0.0.0 (with auth) to expose it.
    host: str = "127.0.0.1"
    invocation_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 20_000
    heartbeat_timeout_ms: int = 20_000
    handshake_timeout_ms: int = 10_000
    shutdown_grace_ms: int = 10_000
    slow_consumer_timeout_ms: int = 30_000
    max_message_size: int = 64 * MiB
    send_queue_size: int = 1024
    # Upgraded sockets on the worker port (workers, /otel, channels); more are
    # refused with HTTP 503 at the upgrade.  Sockets still in their handshake
    # have a budget of the same size of their own (iii.admission).
    max_connections: Count = Count(1024)
    # Sockets from one peer address that hold no credential (every socket in
    # its handshake, and every socket when auth.tokens is off); more are
    # refused on accept.  Loopback is one address like any other.
    max_connections_per_address: Count = Count(256)
    # Calls one worker may have outstanding (request/response and
    # fire-and-forget); more are answered ``too_many_pending_invocations``.
    max_pending_invocations: int = 4096
    # Streaming channels (iii.channels): bytes one channel may buffer, bytes
    # all channels together may buffer (a writer past either waits), and
    # channels workers may have open (engine::channels::create).
    channel_buffer_bytes: int = 4 * MiB
    channels_max_bytes: int = 256 * MiB
    max_channels: int = 10_000
    # Bytes of peer messages held at once on all WebSocket ports together
    # (queued for the engine's readers, or being received), beyond each
    # socket's small read-ahead (iii.inbound).  A socket that finds no room is
    # not read (backpressure); one that waits past inbound_wait_timeout_ms is
    # closed with 1013.  At least max_message_size.
    max_inbound_bytes: int = 256 * MiB
    inbound_wait_timeout_ms: int = 15_000
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    tls: TlsConfig = attrs.field(factory=TlsConfig)
    cluster: ClusterConfig | None = None
    # ``serve --processes``: engine processes on this machine (iii.cluster.supervisor);
    # "auto" = the number of cores.  None or 1: this process is the engine.
    processes: int | str | None = None
    modules: tuple[ModuleEntry, ...] = ()

    def __attrs_post_init__(self) -> None:
        # A value out of range is a config error (exit 2), not a surprise at
        # run time: port 70000 would wrap to 4464, a negative timeout makes
        # trio raise in the middle of a connection.
        for name, (low, high) in _ENGINE_RANGES.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                limit = f"at least {low}" if high is None else f"between {low} and {high}"
                raise ValueError(f"{name}: must be {limit}, got {value}")
        if self.max_inbound_bytes < self.max_message_size:
            raise ValueError(
                f"max_inbound_bytes: must be at least max_message_size "
                f"({self.max_message_size}), got {self.max_inbound_bytes}"
            )

    @property
    def invocation_timeout(self) -> float:
        return self.invocation_timeout_ms / 1000

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_interval_ms / 1000

    @property
    def heartbeat_timeout(self) -> float:
        return self.heartbeat_timeout_ms / 1000

    @property
    def handshake_timeout(self) -> float:
        return self.handshake_timeout_ms / 1000

    @property
    def shutdown_grace(self) -> float:
        return self.shutdown_grace_ms / 1000

    @property
    def slow_consumer_timeout(self) -> float:
        return self.slow_consumer_timeout_ms / 1000

    @property
    def inbound_wait_timeout(self) -> float:
        return self.inbound_wait_timeout_ms / 1000

    def module_config(self, class_name: str) -> Any:
        for entry in self.modules:
            if entry.class_name == class_name:
                return entry.config
        return None

    def listen_keys(
        self, module_config: Any = None, host_key: str = "host", port_key: str = "port"
    ) -> tuple[str, bool]:
        """The config keys that set a listener's address, for its bind error
        (:class:`~iii.errors.BindError`): the engine's own (``module_config``
        None) or those of the module entry whose config is ``module_config``.
        Returns (text, whether the keys belong in the file)."""
        if module_config is None:
            return f"config keys {host_key} and {port_key}", True
        for entry in self.modules:
            if entry.config is module_config:
                if entry.key is not None:
                    return f"config keys {entry.key}.{host_key} and {entry.key}.{port_key}", True
                return (
                    f"config keys {host_key} and {port_key} of {entry.class_name}: "
                    "defaults, as the config lists no modules",
                    False,
                )
        return f"config keys {host_key} and {port_key} of the module", False


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)

    def strict(kind: type, name: str) -> Any:
        def hook(value: Any, _: type) -> Any:
            if isinstance(value, bool) and kind is not bool:
                raise TypeError(f"expected {name}, got a boolean")
            if kind is float and isinstance(value, int):
                return float(value)
            if not isinstance(value, kind):
                raise TypeError(f"expected {name}, got {_type_name(value)}")
            return value

        return hook

    converter.register_structure_hook(str, strict(str, "a string"))
    converter.register_structure_hook(int, strict(int, "an integer"))
    converter.register_structure_hook(float, strict(float, "a number"))
    converter.register_structure_hook(bool, strict(bool, "a boolean"))
    converter.register_structure_hook(Any, lambda v, _: v)

    def structure_count(value: Any, _: type) -> Count:
        number = strict(int, "an integer")(value, int)
        if number < 1:
            raise ValueError(f"must be at least 1, got {number}")
        return Count(number)

    converter.register_structure_hook(Count, structure_count)

    def structure_adapter(value: Any, _: type) -> AdapterRef:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping with 'class' and 'config', got {_type_name(value)}")
        extra = set(value) - {"class", "config"}
        if extra:
            raise cattrs.ForbiddenExtraKeysError("", AdapterRef, extra)
        class_name = value.get("class")
        if not isinstance(class_name, str):
            raise TypeError("'class' is required and must be a string")
        return AdapterRef(class_name=class_name, config=value.get("config"))

    converter.register_structure_hook(AdapterRef, structure_adapter)

    def structure_patterns(value: Any, _: type) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"expected a list of strings, got {_type_name(value)}")
        return tuple(value)

    # A bare string must not become a tuple of characters.
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], structure_patterns)
    # The token secret comes from the environment only (see AuthToken).
    converter.register_structure_hook(
        AuthToken,
        make_dict_structure_fn(
            AuthToken, converter, _cattrs_forbid_extra_keys=True, secret=override(omit=True)
        ),
    )
    converter.register_unstructure_hook(
        AuthToken, make_dict_unstructure_fn(AuthToken, converter, secret=override(omit=True))
    )
    converter.register_structure_hook(
        ClusterConfig,
        make_dict_structure_fn(
            ClusterConfig, converter, _cattrs_forbid_extra_keys=True, secret=override(omit=True)
        ),
    )
    converter.register_unstructure_hook(
        ClusterConfig, make_dict_unstructure_fn(ClusterConfig, converter, secret=override(omit=True))
    )

    def structure_processes(value: Any, _: Any) -> int | str | None:
        if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value  # type: ignore[no-any-return]
        raise TypeError(f'expected a number or "auto", got {_type_name(value)}')

    converter.register_structure_hook_func(lambda t: t == (int | str | None), structure_processes)
    converter.register_unstructure_hook(
        AdapterRef, lambda ref: {"class": ref.class_name, "config": ref.config if ref.config is not None else {}}
    )
    return converter


CONFIG_CONVERTER = _make_converter()


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _format_error(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        keys = ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in exc.extra_fields))
        return f"unknown key{'s' if len(exc.extra_fields) > 1 else ''}: {keys}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    return str(exc) or type(exc).__name__


def _structure(data: Any, cls: type, *, file: str | None, path: str) -> Any:
    try:
        return CONFIG_CONVERTER.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        first = cattrs.transform_error(exc, path="$", format_exception=_format_error)[0]
        reason, _, where = first.rpartition(" @ ")
        suffix = where[1:] if where.startswith("$") else ""
        key = (path + suffix) if path else suffix.lstrip(".")
        raise ConfigError(reason, file=file, key=key or None) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), file=file, key=path or None) from None


# -- env expansion ---------------------------------------------------------------


def expand_env(value: Any, *, file: str | None = None, path: str = "", env: Any = None) -> Any:
    """Expand ``${VAR}`` / ``${VAR:default}`` in every string of a parsed tree."""
    environ = os.environ if env is None else env
    if isinstance(value, dict):
        return {
            k: expand_env(v, file=file, path=f"{path}.{k}" if path else str(k), env=environ)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, file=file, path=f"{path}[{i}]", env=environ) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return str(environ[name])
        if default is not None:
            return default
        raise ConfigError(
            f"environment variable {name} is not set and has no default (write ${{{name}:default}})",
            file=file,
            key=path or None,
        )

    expanded = _ENV_REF.sub(substitute, value)
    if _ENV_REF.fullmatch(value):
        # A value that is one reference takes the type of what it expands to.
        return scalar_from_env(expanded)
    return expanded


# YAML 1.2 core schema scalars.  Not PyYAML's YAML 1.1 rules, under which an
# environment value of yes/no/on/off would become a boolean, 12:30 the integer
# 750 and 010 an octal 8.
_NULL = re.compile(r"null|Null|NULL|~")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+")
_OCT = re.compile(r"0o[0-7]+")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(inf|Inf|INF)")
_NAN = re.compile(r"\.(nan|NaN|NAN)")


def scalar_from_env(text: str) -> Any:
    """An expanded ``${VAR}`` as a YAML 1.2 core scalar: null, bool, int, float, or the text."""
    if _NULL.fullmatch(text):
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _INT.fullmatch(text):
        return int(text, 10)
    if _OCT.fullmatch(text):
        return int(text[2:], 8)
    if _HEX.fullmatch(text):
        return int(text[2:], 16)
    if _FLOAT.fullmatch(text):
        return float(text)
    if _INF.fullmatch(text):
        return float("-inf") if text.startswith("-") else float("inf")
    if _NAN.fullmatch(text):
        return float("nan")
    return text


# -- loading -----------------------------------------------------------------------


def _read_file(path: Path) -> Any:
    # Size, aliases, depth and duplicate keys are bounded there (issue 10).
    return read_config_file(path)


def _module_entry(raw: Any, index: int, file: str | None, *, listed: bool = True) -> ModuleEntry:
    path = f"modules[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping with 'class' and 'config', got {_type_name(raw)}", file=file, key=path)
    unknown = set(raw) - {"class", "config"}
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(sorted(unknown))}", file=file, key=path)
    class_name = raw.get("class")
    if not isinstance(class_name, str):
        raise ConfigError("'class' is required and must be a string", file=file, key=f"{path}.class")
    spec = MODULE_SPECS.get(class_name)
    if spec is None:
        known = ", ".join(sorted(MODULE_SPECS))
        raise ConfigError(f"unknown module class {class_name!r} (known: {known})", file=file, key=f"{path}.class")
    return ModuleEntry(
        class_name=class_name,
        config=_module_config(spec.class_name, raw.get("config"), file=file, path=f"{path}.config"),
        key=f"{path}.config" if listed else None,
    )


def _module_config(class_name: str, raw: Any, *, file: str | None, path: str) -> Any:
    spec = MODULE_SPECS[class_name]
    if not spec.available:
        return raw  # kept as given; the engine logs that the module is not available
    config_cls = spec.load().Config
    if getattr(config_cls, "LENIENT", False):
        return config_cls(raw={} if raw is None else raw)
    return _structure({} if raw is None else raw, config_cls, file=file, path=path)


def parse_config(raw: Any, *, file: str | None = None, env: Any = None) -> EngineConfig:
    """Build an :class:`EngineConfig` from an already-parsed YAML/TOML tree."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping, got {_type_name(raw)}", file=file)
    raw = expand_env(raw, file=file, env=env)
    raw_modules = raw.pop("modules", None)
    if raw_modules is None:
        entries = [{"class": name} for name in DEFAULT_MODULES]
    elif not isinstance(raw_modules, list):
        raise ConfigError(f"expected a list, got {_type_name(raw_modules)}", file=file, key="modules")
    else:
        entries = raw_modules
    if raw.get("port") == 0:
        raw["port"] = DEFAULT_PORT  # upstream: 0 or missing means the default port
    engine: EngineConfig = _structure(raw, EngineConfig, file=file, path="")
    engine = attrs.evolve(
        engine,
        auth=_resolve_tokens(engine.auth, os.environ if env is None else env, file),
        tls=_check_tls(engine.tls, file),
        cluster=_resolve_cluster(engine.cluster, os.environ if env is None else env, file),
    )
    _check_processes(engine.processes, file)
    modules: list[ModuleEntry] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        module = _module_entry(entry, index, file, listed=raw_modules is not None)
        if module.class_name in seen and not MODULE_SPECS[module.class_name].repeatable:
            raise ConfigError(
                f"module {module.class_name} is listed twice (also at modules[{seen[module.class_name]}])",
                file=file,
                key=f"modules[{index}].class",
            )
        seen[module.class_name] = index
        modules.append(module)
    _name_instances(modules, file)
    for spec in MODULE_SPECS.values():
        if spec.mandatory and spec.class_name not in seen:
            modules.append(
                ModuleEntry(
                    class_name=spec.class_name,
                    config=_module_config(spec.class_name, None, file=file, path=""),
                )
            )
    return attrs.evolve(engine, modules=tuple(modules))


def _name_instances(modules: list[ModuleEntry], file: str | None) -> None:
    """Name the entries of each module that may be listed several times (in place)."""
    for spec in MODULE_SPECS.values():
        if not (spec.repeatable and spec.available):
            continue
        indexes = [i for i, entry in enumerate(modules) if entry.class_name == spec.class_name]
        if not indexes:
            continue
        named = spec.load().name_instances(
            [modules[i].config for i in indexes],
            file=file,
            keys=[f"modules[{i}].config" for i in indexes],
        )
        for i, config in zip(indexes, named, strict=True):
            modules[i] = attrs.evolve(modules[i], config=config)


MIN_TOKEN_LENGTH = 16


def _resolve_tokens(auth: AuthConfig, environ: Any, file: str | None) -> AuthConfig:
    """Read each token's secret from its environment variable."""
    tokens = []
    seen: dict[str, int] = {}
    labels: dict[str, int] = {}
    for index, token in enumerate(auth.tokens):
        key = f"auth.tokens[{index}].env"
        secret = str(environ.get(token.env, "")).strip()
        if not secret:
            raise ConfigError(f"environment variable {token.env} (the token's secret) is not set", file=file, key=key)
        if len(secret) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"the token in {token.env} has {len(secret)} characters; use at least {MIN_TOKEN_LENGTH}",
                file=file,
                key=key,
            )
        if secret in seen:
            raise ConfigError(
                f"the token in {token.env} is the same as auth.tokens[{seen[secret]}]'s", file=file, key=key
            )
        seen[secret] = index
        _check_patterns(token, index, file)
        if token.label in labels:
            raise ConfigError(
                f"two tokens are named {token.label!r} (also auth.tokens[{labels[token.label]}]); "
                "names must be unique",
                file=file,
                key=f"auth.tokens[{index}].name",
            )
        labels[token.label] = index
        tokens.append(attrs.evolve(token, secret=secret))
    return attrs.evolve(auth, tokens=tuple(tokens))


def _resolve_cluster(cluster: ClusterConfig | None, environ: Any, file: str | None) -> ClusterConfig | None:
    """Check ``cluster:`` and read its token from ``token_env``."""
    if cluster is None:
        return None
    if not cluster.name.strip():
        raise ConfigError("must not be empty", file=file, key="cluster.name")
    if not cluster.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("must be a redis://, rediss:// or unix:// URL", file=file, key="cluster.redis_url")
    if cluster.advertise is not None:
        match = re.fullmatch(r"wss?://[^/:\s]+(:\d{1,5})?/?", cluster.advertise)
        if match is None or (match.group(1) is not None and int(match.group(1)[1:]) > 65535):
            raise ConfigError("must be ws://host:port or wss://host:port", file=file, key="cluster.advertise")
    if not 100 <= cluster.dead_after_ms <= 600_000:
        raise ConfigError(
            f"must be between 100 and 600000, got {cluster.dead_after_ms}", file=file, key="cluster.dead_after_ms"
        )
    secret = str(environ.get(cluster.token_env, "")).strip()
    if not secret:
        raise ConfigError(
            f"environment variable {cluster.token_env} (the cluster token) is not set",
            file=file,
            key="cluster.token_env",
        )
    if len(secret) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"the token in {cluster.token_env} has {len(secret)} characters; use at least {MIN_TOKEN_LENGTH}",
            file=file,
            key="cluster.token_env",
        )
    return attrs.evolve(cluster, secret=secret)


def _check_processes(processes: int | str | None, file: str | None) -> None:
    if processes is None or processes == "auto":
        return
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= 256:
        raise ConfigError(
            f"must be a number from 1 to 256 or \"auto\", got {processes!r}", file=file, key="processes"
        )


def _check_patterns(token: AuthToken, index: int, file: str | None) -> None:
    """Each pattern is a non-empty string; ``trigger_types`` entries are ``type`` or
    ``type(resource-pattern)`` (see :mod:`iii.grants`)."""
    for field in ("register", "invoke", "trigger_types"):
        for position, entry in enumerate(getattr(token, field)):
            key = f"auth.tokens[{index}].{field}[{position}]"
            if not entry.strip():
                raise ConfigError("an empty pattern", file=file, key=key)
            if field == "trigger_types":
                try:
                    parse_trigger_type_entry(entry)
                except ValueError as exc:
                    raise ConfigError(str(exc), file=file, key=key) from None


def _check_tls(tls: TlsConfig, file: str | None) -> TlsConfig:
    if (tls.cert is None) != (tls.key is None):
        missing = "tls.key" if tls.key is None else "tls.cert"
        raise ConfigError("tls.cert and tls.key must be given together", file=file, key=missing)
    for name in ("cert", "key"):
        path = getattr(tls, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"file not found: {path}", file=file, key=f"tls.{name}")
    return tls


def load_config(path: str | os.PathLike[str] | None, *, env: Any = None) -> EngineConfig:
    """Load a config file; ``None`` gives the defaults."""
    if path is None:
        return parse_config({}, env=env)
    return parse_config(read_config_tree(path), file=str(Path(path)), env=env)


def read_config_tree(path: str | os.PathLike[str]) -> Any:
    """A config file's parsed tree, before validation (:func:`parse_config` does that)."""
    file = Path(path)
    try:
        return _read_file(file)
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(file)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None


def default_config() -> EngineConfig:
    return parse_config({})


# -- showing -------------------------------------------------------------------------


def config_to_dict(config: EngineConfig) -> dict[str, Any]:
    """The effective config with every default filled in, in the file's shape."""
    top = {
        field.name: CONFIG_CONVERTER.unstructure(getattr(config, field.name))
        for field in attrs.fields(EngineConfig)
        if field.name != "modules"
    }
    modules = []
    for entry in config.modules:
        module_config = entry.config
        if attrs.has(type(module_config)):
            if getattr(type(module_config), "LENIENT", False):
                module_config = module_config.raw
            else:
                module_config = CONFIG_CONVERTER.unstructure(module_config)
        modules.append({"class": entry.class_name, "config": module_config if module_config is not None else {}})
    top["modules"] = modules
    return top


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def dump_config(config: EngineConfig, fmt: str = "yaml") -> str:
    data = config_to_dict(config)
    if fmt == "toml":
        return tomli_w.dumps(_drop_none(data))  # TOML has no null
    text: str = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return text
