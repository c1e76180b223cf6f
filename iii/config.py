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
* An unknown module class, an unknown key (top level, in a module's config,
  or in its ``adapter`` block's config) and a wrongly typed value (a boolean
  where an integer is expected, too) are errors.  Each module's config,
  adapter block included, is structured here into frozen attrs classes
  (:mod:`iii.config_schema`), so ``check-config`` catches everything
  ``serve`` would refuse.
* A module listed twice is an error, except the exec module (one pipeline
  per entry, each named: see ``ModuleSpec.repeatable``).
* A hostile file (too large, a "billion laughs" of aliases, nesting past 64
  levels, a duplicate key) is refused by :mod:`iii.config_files`.

With no file, or a file without ``modules``, the default module set is used.
The mandatory modules (worker, telemetry) are added when missing.

The types are in :mod:`iii.config_schema` (a leaf, so the adapters and the
modules can declare their configs without importing this loader, which
imports them); they are re-exported here.

Lifetime: loaded once, before the engine starts, into frozen values; nothing
here opens anything or runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import attrs
import tomli_w
import yaml

from iii.adapters.kvstore import KvStoreConfig
from iii.config_files import read_config_file
from iii.config_schema import (
    CONFIG_CONVERTER,
    DEFAULT_PORT,
    AdapterRef,
    AuthConfig,
    AuthToken,
    ClusterConfig,
    Count,
    EngineConfig,
    ModuleEntry,
    TlsConfig,
    structure_config,
    type_name,
)
from iii.errors import ConfigError
from iii.grants import parse_trigger_type_entry
from iii.modules import DEFAULT_MODULES, MODULE_SPECS
from iii.security import server_ssl_context

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

_ENV_REF = re.compile(r"\$\{([^}:]+)(?::([^}]*))?\}")


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
        return [
            expand_env(v, file=file, path=f"{path}[{i}]", env=environ) for i, v in enumerate(value)
        ]
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
        raise ConfigError(
            f"expected a mapping with 'class' and 'config', got {type_name(raw)}",
            file=file,
            key=path,
        )
    unknown = set(raw) - {"class", "config"}
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(sorted(unknown))}",
            file=file,
            key=path,
        )
    class_name = raw.get("class")
    if not isinstance(class_name, str):
        raise ConfigError(
            "'class' is required and must be a string", file=file, key=f"{path}.class"
        )
    spec = MODULE_SPECS.get(class_name)
    if spec is None:
        known = ", ".join(sorted(MODULE_SPECS))
        raise ConfigError(
            f"unknown module class {class_name!r} (known: {known})", file=file, key=f"{path}.class"
        )
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
    return structure_config({} if raw is None else raw, config_cls, file=file, path=path)


def parse_config(raw: Any, *, file: str | None = None, env: Any = None) -> EngineConfig:
    """Build an :class:`EngineConfig` from an already-parsed YAML/TOML tree."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping, got {type_name(raw)}", file=file)
    raw = expand_env(raw, file=file, env=env)
    raw_modules = raw.pop("modules", None)
    if raw_modules is None:
        entries = [{"class": name} for name in DEFAULT_MODULES]
    elif not isinstance(raw_modules, list):
        raise ConfigError(
            f"expected a list, got {type_name(raw_modules)}", file=file, key="modules"
        )
    else:
        entries = raw_modules
    port = raw.get("port")
    if port == 0 and type(port) is int:  # not False: a boolean is refused below
        raw["port"] = DEFAULT_PORT  # upstream: 0 or missing means the default port
    engine: EngineConfig = structure_config(raw, EngineConfig, file=file, path="")
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
    _check_store_directories(modules, file)
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


def _check_store_directories(modules: list[ModuleEntry], file: str | None) -> None:
    """Two file-based embedded stores may not share a directory.

    Each holds the directory's lock while it runs, so the second would fail
    when the engine starts (``KvStoreLockedError``); this says so at load,
    naming both keys.
    """
    taken: dict[str, str] = {}
    for entry in modules:
        where = entry.key or entry.class_name
        config = entry.config
        stores = [(config, where)]
        adapter = getattr(config, "adapter", None)
        if isinstance(adapter, AdapterRef):
            stores.append((adapter.config, f"{where}.adapter.config"))
        for store, key in stores:
            if not (isinstance(store, KvStoreConfig) and store.file_based):
                continue
            directory = os.path.normpath(os.path.abspath(store.file_path))
            if directory in taken:
                raise ConfigError(
                    f"{store.file_path!r} is already the directory of the store at "
                    f"{taken[directory]}.file_path; give each store its own",
                    file=file,
                    key=f"{key}.file_path",
                )
            taken[directory] = key


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
            raise ConfigError(
                f"environment variable {token.env} (the token's secret) is not set",
                file=file,
                key=key,
            )
        if len(secret) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"the token in {token.env} has {len(secret)} characters; use at least {MIN_TOKEN_LENGTH}",
                file=file,
                key=key,
            )
        if secret in seen:
            raise ConfigError(
                f"the token in {token.env} is the same as auth.tokens[{seen[secret]}]'s",
                file=file,
                key=key,
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


def _resolve_cluster(
    cluster: ClusterConfig | None, environ: Any, file: str | None
) -> ClusterConfig | None:
    """Check ``cluster:`` and read its token from ``token_env``."""
    if cluster is None:
        return None
    if not cluster.name.strip():
        raise ConfigError("must not be empty", file=file, key="cluster.name")
    if not cluster.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            "must be a redis://, rediss:// or unix:// URL", file=file, key="cluster.redis_url"
        )
    if cluster.advertise is not None:
        match = re.fullmatch(r"wss?://[^/:\s]+(:\d{1,5})?/?", cluster.advertise)
        if match is None or (match.group(1) is not None and int(match.group(1)[1:]) > 65535):
            raise ConfigError(
                "must be ws://host:port or wss://host:port", file=file, key="cluster.advertise"
            )
    if not 100 <= cluster.dead_after_ms <= 600_000:
        raise ConfigError(
            f"must be between 100 and 600000, got {cluster.dead_after_ms}",
            file=file,
            key="cluster.dead_after_ms",
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
            f'must be a number from 1 to 256 or "auto", got {processes!r}',
            file=file,
            key="processes",
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
    try:
        server_ssl_context(tls)  # what every listener does at start: a bad PEM fails here
    except ConfigError as exc:
        raise ConfigError(exc.reason, file=file, key=exc.key) from None
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
            module_config = CONFIG_CONVERTER.unstructure(module_config)
        modules.append(
            {
                "class": entry.class_name,
                "config": module_config if module_config is not None else {},
            }
        )
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
