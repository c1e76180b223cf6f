"""The observability module's config (upstream ``OtelModule`` keys, spec modules.md §8).

For the keys upstream reads from the environment, the YAML value wins; when a
key is missing its environment variable is used; otherwise the default.  The
environment is read when the config is loaded (a structure hook on the shared
config converter), so ``check-config`` and ``config show`` see the result.

Differences from upstream, on purpose:

* unknown keys are an error (upstream ignores them) — typos should not pass;
* the OTLP exporter speaks OTLP/HTTP (protobuf), so ``endpoint`` defaults to
  ``http://localhost:4318`` (upstream: gRPC on 4317);
* ``prometheus_*`` keys: the metrics port, with the Prometheus text endpoint
  that upstream's README promises and nothing serves, and the engine's
  ``/healthz`` and ``/readyz``.  Upstream has no such port, so it is off
  unless asked for: ``prometheus_enabled`` defaults to true when
  ``prometheus_port`` or ``prometheus_host`` is given, else to false (an
  upstream config opens no port upstream would not);
* byte bounds on what the module keeps in memory (upstream bounds its stores
  in entries only, which lets peers fill them with 64 MiB entries):
  ``logs_max_bytes`` and ``logs_max_entry_bytes`` (the log store and one log),
  ``memory_max_bytes`` (the memory span store) and ``span_max_bytes`` (one
  span, stored or exported), ``metrics_max_bytes`` (SDK metric points).  Each
  is an integer of at least :data:`MIN_ENTRY_BYTES`, and one entry's bound may
  not exceed its store's.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import attrs
from cattrs.errors import AttributeValidationNote, ClassValidationError
from cattrs.gen import make_dict_structure_fn

from iii.config_schema import CONFIG_CONVERTER

__all__ = ["Config", "Sampling", "SamplingRule", "RateLimit", "MIN_ENTRY_BYTES"]

KiB = 1024
MiB = 1024 * KiB
# The least a byte bound may be: room for one entry's ids, names and the note
# saying it was cut (iii.modules.observability.bounds).
MIN_ENTRY_BYTES = 4 * KiB

Exporter = Literal["memory", "otlp", "both"]


@attrs.frozen(kw_only=True)
class SamplingRule:
    operation: str = "*"  # glob on the span name
    service: str = "*"  # glob on service_name
    rate: float = 1.0


@attrs.frozen(kw_only=True)
class RateLimit:
    max_traces_per_second: float


@attrs.frozen(kw_only=True)
class Sampling:
    default: float | None = None  # falls back to sampling_ratio
    parent_based: bool = False
    rules: tuple[SamplingRule, ...] = ()
    rate_limit: RateLimit | None = None


@attrs.frozen(kw_only=True)
class Config:
    enabled: bool = False
    service_name: str = "iii"
    service_version: str = "unknown"
    service_namespace: str | None = None
    exporter: Exporter = "otlp"
    endpoint: str = "http://localhost:4318"
    sampling_ratio: float = 1.0
    sampling: Sampling | None = None
    memory_max_spans: int = 1000
    memory_max_bytes: int = 16 * MiB
    span_max_bytes: int = 64 * KiB
    metrics_enabled: bool = False
    metrics_exporter: Literal["memory", "otlp"] = "memory"
    metrics_retention_seconds: int = 3600
    metrics_max_count: int = 10_000
    metrics_max_bytes: int = 16 * MiB
    logs_enabled: bool | None = None  # parsed; upstream does not gate anything on it
    logs_exporter: Exporter = "memory"
    logs_max_count: int = 1000
    logs_max_bytes: int = 16 * MiB
    logs_max_entry_bytes: int = 64 * KiB
    logs_retention_seconds: int | None = None
    logs_batch_size: int = 100
    logs_flush_interval_ms: int = 5000
    logs_sampling_ratio: float = 1.0
    logs_console_output: bool = True
    level: str = "info"
    log_level: str | None = None  # alias of level
    format: Literal["default", "json"] = "default"
    # Parsed so upstream configs load; alert evaluation is not implemented.
    alerts: tuple[Any, ...] = ()
    # Default: true when prometheus_port or prometheus_host is given (the
    # structure hook below), else false.
    prometheus_enabled: bool = False
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9464

    @property
    def memory_traces(self) -> bool:
        return self.exporter in ("memory", "both")

    @property
    def otlp_traces(self) -> bool:
        return self.exporter in ("otlp", "both")

    @property
    def store_level(self) -> str:
        return (self.log_level or self.level).lower()

    def otlp_url(self, signal: str) -> str:
        """``<endpoint>/v1/<signal>`` unless the endpoint already names a path."""
        base = self.endpoint.rstrip("/")
        if base.endswith(f"/v1/{signal}"):
            return base
        return f"{base}/v1/{signal}"


# key -> (environment variable, type)
ENV_FALLBACKS: dict[str, tuple[str, type]] = {
    "enabled": ("OTEL_ENABLED", bool),
    "service_name": ("OTEL_SERVICE_NAME", str),
    "service_version": ("SERVICE_VERSION", str),
    "service_namespace": ("SERVICE_NAMESPACE", str),
    "exporter": ("OTEL_EXPORTER_TYPE", str),
    "endpoint": ("OTEL_EXPORTER_OTLP_ENDPOINT", str),
    "sampling_ratio": ("OTEL_TRACES_SAMPLER_ARG", float),
    "memory_max_spans": ("OTEL_MEMORY_MAX_SPANS", int),
    "metrics_enabled": ("OTEL_METRICS_ENABLED", bool),
    "metrics_exporter": ("OTEL_METRICS_EXPORTER", str),
    "logs_exporter": ("OTEL_LOGS_EXPORTER", str),
}


def _from_env(value: str, kind: type) -> Any:
    if kind is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind is int:
        return int(value)
    if kind is float:
        return float(value)
    return value


_structure_config = make_dict_structure_fn(Config, CONFIG_CONVERTER, _cattrs_forbid_extra_keys=True)

# (key, the store's key it may not exceed)
_BYTE_BOUNDS = (
    ("logs_max_bytes", None),
    ("logs_max_entry_bytes", "logs_max_bytes"),
    ("memory_max_bytes", None),
    ("span_max_bytes", "memory_max_bytes"),
    ("metrics_max_bytes", None),
)


def _check_byte_bounds(config: Config) -> None:
    """Each byte bound is at least MIN_ENTRY_BYTES, and an entry's at most its store's;
    the error names the key (cattrs' notes carry it to the ``FILE: key: reason`` text)."""
    for key, store_key in _BYTE_BOUNDS:
        value = getattr(config, key)
        reason = None
        if value < MIN_ENTRY_BYTES:
            reason = f"must be at least {MIN_ENTRY_BYTES} (bytes), got {value}"
        elif store_key is not None and value > getattr(config, store_key):
            reason = f"must not exceed {store_key} ({getattr(config, store_key)}), got {value}"
        if reason is not None:
            error = ValueError(reason)
            error.__notes__ = [
                AttributeValidationNote(f"Structuring class Config @ attribute {key}", key, int)
            ]
            raise ClassValidationError("While structuring Config", [error], Config)


def _structure_with_env(raw: Any, _: type) -> Config:
    if not isinstance(raw, dict):
        raise TypeError("expected a mapping")
    raw = dict(raw)
    for key, (variable, kind) in ENV_FALLBACKS.items():
        if key not in raw and os.environ.get(variable, "").strip():
            try:
                raw[key] = _from_env(os.environ[variable], kind)
            except ValueError:
                raise ValueError(
                    f"{variable}={os.environ[variable]!r} is not a valid {kind.__name__}"
                ) from None
    if "prometheus_enabled" not in raw and ("prometheus_port" in raw or "prometheus_host" in raw):
        raw["prometheus_enabled"] = True  # a port given is a port asked for
    config = _structure_config(raw, Config)
    _check_byte_bounds(config)
    return config


CONFIG_CONVERTER.register_structure_hook(Config, _structure_with_env)
