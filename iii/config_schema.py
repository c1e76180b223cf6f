"""The config schema: the frozen attrs types a config file is structured into.

A leaf module (it imports only :mod:`iii.errors` from this package), so every
layer may use it: the adapters declare their backends' config classes and
their :class:`AdapterRef` subclass against it, the modules their ``Config``,
and :mod:`iii.config` (the loader, above the modules) reads a file into
:class:`EngineConfig`.  The layers read::

    core (errors, protocol, registry, invocations) → config schema → adapters
        → modules → config loader, engine → cli

What lives here:

* :class:`EngineConfig` and its parts (:class:`AuthConfig`, :class:`TlsConfig`,
  :class:`ModuleEntry`), and the constrained scalar :data:`Count`;
* :class:`AdapterRef` / :class:`AdapterKind`: a module's ``adapter`` block,
  structured into the chosen backend's own config class when the file is
  loaded, so ``check-config`` catches what ``serve`` would;
* :data:`CONFIG_CONVERTER`: the cattrs converter every config class goes
  through: unknown keys are errors, a boolean is not an integer (``port:
  false`` is refused, not read as 0), a ``Literal`` lists its choices;
* :func:`structure_config`: structures one block and turns the first
  failure into a :class:`~iii.errors.ConfigError` carrying the full key path
  (``modules[3].config.adapter.config.max_attempts``).

Lifetime: values only; nothing here opens or runs anything.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, NewType, Self

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, ClassValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from iii.errors import ConfigError

__all__ = [
    "AdapterKind",
    "AdapterRef",
    "AuthConfig",
    "AuthToken",
    "CONFIG_CONVERTER",
    "ClusterConfig",
    "Count",
    "DEFAULT_PORT",
    "EMBEDDED",
    "EngineConfig",
    "FieldValueError",
    "ModuleEntry",
    "check",
    "TlsConfig",
    "structure_config",
    "type_name",
]

DEFAULT_PORT = 49134
MiB = 1024 * 1024


# An integer that must be at least 1 (a limit of 0 would refuse everything).
Count = NewType("Count", int)


class FieldValueError(ValueError):
    """A value a class's validator refuses: names the key, so the error's path can.

    Raised from an attrs validator (see :func:`check`); :func:`structure_config`
    puts ``key`` at the end of the path it reports.
    """

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def check(test: Callable[[Any], bool], reason: str) -> Callable[[Any, Any, Any], None]:
    """An attrs validator: ``test(value)`` or a :class:`FieldValueError` saying ``reason``."""

    def validate(_: Any, attribute: Any, value: Any) -> None:
        if not test(value):
            raise FieldValueError(attribute.name, f"{reason}, got {value!r}")

    return validate


@attrs.frozen(kw_only=True)
class AdapterKind:
    """One kind of adapter (queue, state …) as the config file sees it.

    ``config_types`` maps each backend's upstream class name to the frozen
    attrs class its ``config`` block is structured into; ``aliases`` maps
    other accepted names to one of those (:data:`EMBEDDED` names the default,
    in-process backend of every kind).  Declared by each adapter package
    (``iii.adapters.<kind>``), which knows its backends.
    """

    name: str
    default: str
    config_types: Mapping[str, type]
    aliases: Mapping[str, str] = attrs.field(factory=dict)

    def canonical(self, class_name: str) -> str | None:
        """The upstream class name ``class_name`` stands for; None if unknown."""
        if class_name in self.config_types:
            return class_name
        return self.aliases.get(class_name)

    def known(self) -> str:
        return ", ".join(sorted({*self.config_types, *self.aliases}))


# The name every adapter kind accepts for its in-process backend (the one it
# uses when a module gives no ``adapter``): upstream's names for it differ by
# kind (BuiltinQueueAdapter, KvStore, KvCronAdapter, LocalAdapter) and stay
# accepted.
EMBEDDED = "embedded"


@attrs.frozen(kw_only=True)
class AdapterRef:
    """A module's ``adapter: {class: <name>, config: {...}}`` block, structured.

    ``class_name`` is the backend's upstream class name (an alias in the file
    is replaced by it); ``config`` is an instance of that backend's config
    class (:attr:`AdapterKind.config_types`), checked when the file is loaded.
    A module's Config declares a subclass per kind, whose ``KIND`` says which
    backends exist (``QueueAdapterRef`` in :mod:`iii.adapters.queue` …).
    """

    KIND: ClassVar[AdapterKind]

    class_name: str
    config: Any

    @classmethod
    def default(cls) -> Self:
        """The kind's default backend with every key at its default."""
        return cls(class_name=cls.KIND.default, config=cls.KIND.config_types[cls.KIND.default]())


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
                raise FieldValueError(name, f"must be {limit}, got {value}")
        if self.max_inbound_bytes < self.max_message_size:
            raise FieldValueError(
                "max_inbound_bytes",
                f"must be at least max_message_size ({self.max_message_size}), "
                f"got {self.max_inbound_bytes}",
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
                raise TypeError(f"expected {name}, got {type_name(value)}")
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

    def structure_literal(value: Any, kind: Any) -> Any:
        allowed = typing.get_args(kind)
        if isinstance(value, bool) or value not in allowed:
            choices = ", ".join(repr(choice) for choice in allowed)
            raise ValueError(f"must be one of {choices}; got {value!r}")
        return value

    def structure_attrs(cls: type) -> Callable[[Any, type], Any]:
        # A config class's block must be a mapping (cattrs alone would say
        # "'list' object has no attribute 'keys'").
        generated: Callable[[Any, type], Any] = make_dict_structure_fn(
            cls, converter, _cattrs_forbid_extra_keys=True
        )

        def hook(value: Any, _: type) -> Any:
            if not isinstance(value, Mapping):
                raise TypeError(f"expected a mapping, got {type_name(value)}")
            return generated(value, cls)

        return hook

    converter.register_structure_hook_factory(attrs.has, structure_attrs)

    def is_literal(kind: Any) -> bool:
        origin: Any = typing.get_origin(kind)
        return origin is Literal

    converter.register_structure_hook_func(is_literal, structure_literal)

    def structure_adapter(value: Any, ref_type: type[AdapterRef]) -> AdapterRef:
        kind = ref_type.KIND
        if value is None:
            return ref_type.default()
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping with 'class' and 'config', got {type_name(value)}")
        extra = set(value) - {"class", "config"}
        if extra:
            raise cattrs.ForbiddenExtraKeysError("", ref_type, extra)
        name = value.get("class")
        if not isinstance(name, str):
            raise _at("class", TypeError("required, a string"), ref_type)
        class_name = kind.canonical(name)
        if class_name is None:
            reason = f"unknown {kind.name} adapter {name!r} (known: {kind.known()})"
            raise _at("class", ValueError(reason), ref_type)
        config_type = kind.config_types[class_name]
        raw = value.get("config")
        try:
            config: Any = converter.structure({} if raw is None else raw, config_type)
        except Exception as exc:  # noqa: BLE001 - re-raised with its key path
            raise _at("config", exc, ref_type) from None
        return ref_type(class_name=class_name, config=config)

    converter.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, AdapterRef), structure_adapter
    )

    def structure_patterns(value: Any, _: type) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"expected a list of strings, got {type_name(value)}")
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
    # The cluster token, like a worker token's secret, comes from the environment only.
    converter.register_structure_hook(
        ClusterConfig,
        make_dict_structure_fn(
            ClusterConfig, converter, _cattrs_forbid_extra_keys=True, secret=override(omit=True)
        ),
    )
    converter.register_unstructure_hook(
        ClusterConfig,
        make_dict_unstructure_fn(ClusterConfig, converter, secret=override(omit=True)),
    )

    def structure_processes(value: Any, _: Any) -> int | str | None:
        if value is None or value == "auto":
            return value  # type: ignore[no-any-return]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f'expected a number or "auto", got {type_name(value)}')

    converter.register_structure_hook_func(lambda t: t == (int | str | None), structure_processes)
    converter.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, AdapterRef),
        lambda ref: {"class": ref.class_name, "config": converter.unstructure(ref.config)},
    )
    return converter


CONFIG_CONVERTER = _make_converter()


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# Marks a FieldValueError's key in the text _format_error gives cattrs.
_FIELD = "\x00"


def _format_error(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, FieldValueError):
        return f"{_FIELD}{exc.key}{_FIELD}{exc.reason}"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        keys = ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in exc.extra_fields))
        return f"unknown key{'s' if len(exc.extra_fields) > 1 else ''}: {keys}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    return str(exc) or type(exc).__name__


def structure_config(data: Any, cls: type, *, file: str | None, path: str) -> Any:
    """``data`` as a ``cls``; a failure is a ConfigError at ``path`` + the failing key."""
    try:
        return CONFIG_CONVERTER.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        first = cattrs.transform_error(exc, path="$", format_exception=_format_error)[0]
        reason, _, where = first.rpartition(" @ ")
        suffix = _dotted(where[1:] if where.startswith("$") else "")
        if reason.startswith(_FIELD):
            field, _, reason = reason[1:].partition(_FIELD)
            suffix += "." + field
        key = (path + suffix) if path else suffix.lstrip(".")
        raise ConfigError(reason, file=file, key=key or None) from None
    except FieldValueError as exc:
        key = f"{path}.{exc.key}" if path else exc.key
        raise ConfigError(exc.reason, file=file, key=key) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), file=file, key=path or None) from None


_MAPPING_KEY = re.compile(r"\['([A-Za-z0-9_.:@/-]*)'\]")


def _dotted(path: str) -> str:
    """cattrs writes a mapping key as ``['orders']``; the file's key path is ``.orders``."""
    return _MAPPING_KEY.sub(lambda match: "." + match.group(1), path)


def _at(key: str, exc: Exception, cls: type) -> ClassValidationError:
    """``exc`` as cattrs' error for attribute ``key`` of ``cls`` (so the path names it)."""
    exc.__notes__ = [
        *getattr(exc, "__notes__", []),
        AttributeValidationNote(f"Structuring class {cls.__name__} @ attribute {key}", key, Any),
    ]
    return ClassValidationError(f"While structuring {cls.__name__}", [exc], cls)
