"""Trace sampling: upstream's ratio, rule list and rate limit as an OpenTelemetry sampler.

* No rules and no rate limit: a ratio ≥ 1 samples everything, ≤ 0 nothing,
  anything else by trace id (``TraceIdRatioBased``), parent-based when
  ``sampling.parent_based`` is set.
* With rules or a rate limit, :class:`RuleSampler` decides (wrapped
  parent-based, as upstream does): the token bucket is checked first (a trace
  over the limit is dropped), then the first rule whose ``operation`` glob
  matches the span name and ``service`` glob matches the service name gives
  the ratio, else the default ratio.

Pure decisions; the token bucket uses ``time.monotonic``.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from iii.modules.observability.config import Config

__all__ = ["build_sampler", "RuleSampler"]


def _ratio_sampler(ratio: float) -> Sampler:
    if ratio >= 1:
        return ALWAYS_ON
    if ratio <= 0:
        return ALWAYS_OFF
    return TraceIdRatioBased(ratio)


class _TokenBucket:
    def __init__(self, per_second: float):
        self.rate = per_second
        self.tokens = per_second
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class RuleSampler(Sampler):
    def __init__(
        self,
        service_name: str,
        default_ratio: float,
        rules: Sequence[tuple[str, str, float]],
        max_traces_per_second: float | None,
    ):
        self.service_name = service_name
        self.default = _ratio_sampler(default_ratio)
        # (span-name regex, does the service glob match us, sampler); first match wins.
        self.rules = [
            (
                re.compile(fnmatch.translate(op)),
                fnmatch.fnmatchcase(service_name, service),
                _ratio_sampler(rate),
            )
            for op, service, rate in rules
        ]
        self.bucket = _TokenBucket(max_traces_per_second) if max_traces_per_second else None

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if self.bucket is not None and not self.bucket.take():
            return SamplingResult(Decision.DROP)
        sampler = self.default
        for operation, service_matches, rule_sampler in self.rules:
            if service_matches and operation.match(name):
                sampler = rule_sampler
                break
        return sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RuleSampler(rules={len(self.rules)}, rate_limited={self.bucket is not None})"


def build_sampler(config: Config) -> Sampler:
    sampling = config.sampling
    default = config.sampling_ratio
    if sampling is not None and sampling.default is not None:
        default = sampling.default
    if sampling is not None and (sampling.rules or sampling.rate_limit is not None):
        return ParentBased(
            RuleSampler(
                config.service_name,
                default,
                [(r.operation, r.service, r.rate) for r in sampling.rules],
                sampling.rate_limit.max_traces_per_second if sampling.rate_limit else None,
            )
        )
    base = _ratio_sampler(default)
    if sampling is not None and sampling.parent_based:
        return ParentBased(base)
    return base
