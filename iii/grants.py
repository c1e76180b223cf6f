"""What one token allows: the :class:`Grant`, and what binding a trigger gives access to.

A grant is built from a token's three pattern lists (``auth.tokens[]`` in the
config; each defaults to ``["*"]``):

* ``register``: function ids its workers may register.  A function that
  receives other parties' data (the stream ``auth_function``, the per-stream
  overrides ``stream::<op>(<stream>)``) must be *named*: matched by a pattern
  other than the bare ``"*"`` (:meth:`Grant.names`).
* ``invoke``: function ids its workers may call, and that the engine may call
  for them: a trigger's function, its condition, the function of an enqueued
  job, and every call an engine function makes for the caller
  (:meth:`Grant.require_invoke`, checked by ``Engine.invoke``).
* ``trigger_types``: entries ``type-pattern`` (``fnmatch``) or
  ``type(resource-pattern)`` (``state(billing*)``, ``queue(billing.*)``).
  A bare entry lets the worker bind (or provide) triggers of the matching
  types.  A *data-bearing* type (one that hands the function data the worker
  did not produce: state values, stream items, published messages, logs,
  queue jobs) is further scoped by a resource, the config key the module
  declares in its :class:`TriggerAccess` (scope, stream, topic, level): a
  binding is allowed when the worker could read that data directly (it may
  invoke the type's ``read_function``, e.g. ``state::get``; for types without
  one, only an unrestricted ``invoke: ["*"]``), or a ``type(pattern)`` entry
  matches the resource.  A binding without a resource (a state trigger on
  every scope) needs ``type(*)``.

The ``type(pattern)`` syntax (rather than ``type:pattern``) because trigger
type names contain colons (``stream:join``) and ``stream:*`` already is a
valid type pattern: parentheses cannot be confused with either, and they read
like the per-stream override names.

Pure functions and frozen values; built once per engine from its config.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any

import attrs

from iii.errors import IIIError

__all__ = [
    "Grant",
    "ALLOW_ALL",
    "CLUSTER_PEER",
    "ALWAYS_INVOKABLE",
    "ForbiddenError",
    "TriggerAccess",
    "parse_trigger_type_entry",
]

# Every SDK calls this at connect to report its metadata; refusing it would
# only lose the worker's name in ``engine::workers::list``.
ALWAYS_INVOKABLE = frozenset({"engine::workers::register"})

_SCOPED = re.compile(r"^(?P<type>[^()]*)\((?P<pattern>.*)\)$", re.DOTALL)


class ForbiddenError(IIIError):
    """A call or registration outside the caller's grant."""

    code = "forbidden"


def parse_trigger_type_entry(entry: str) -> tuple[str, str | None]:
    """``("type-pattern", None)`` or ``("type", "resource-pattern")``; ValueError if malformed."""
    if not entry.strip():
        raise ValueError("an empty entry")
    match = _SCOPED.match(entry)
    if match is None:
        if "(" in entry or ")" in entry:
            raise ValueError(f"{entry!r}: write a scoped entry as type(resource-pattern)")
        return entry, None
    trigger_type, pattern = match.group("type"), match.group("pattern")
    if not trigger_type.strip():
        raise ValueError(f"{entry!r}: the trigger type before '(' is missing")
    if any(char in trigger_type for char in "*?["):
        raise ValueError(f"{entry!r}: the trigger type before '(' must be a name, not a pattern")
    if not pattern.strip():
        raise ValueError(f"{entry!r}: the resource pattern inside '()' is empty")
    return trigger_type, pattern


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for a pattern list; None means "everything"."""
    if "*" in patterns:
        return None
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _matches(pattern: re.Pattern[str] | None, value: str) -> bool:
    return pattern is None or pattern.match(value) is not None


@attrs.frozen(kw_only=True)
class TriggerAccess:
    """What a trigger type's config names, declared once by the module providing the type.

    ``function_keys``: config keys whose value is a function id the engine
    calls (conditions).  ``data``: the type hands the function data the
    worker did not produce; then ``resource_key`` names the config key that
    scopes it (missing or ``""`` = every resource) and ``read_function`` the
    function whose invoke grant already lets a worker read that data (None:
    only ``invoke: ["*"]`` does).
    """

    function_keys: tuple[str, ...] = ()
    data: bool = False
    resource_key: str | None = None
    read_function: str | None = None

    def functions_named(self, config: Any) -> list[str]:
        if not isinstance(config, dict):
            return []
        return [
            value
            for key in self.function_keys
            if isinstance(value := config.get(key), str) and value
        ]

    def resource(self, config: Any) -> str | None:
        """The resource a binding asks for; None = every resource."""
        if self.resource_key is None or not isinstance(config, dict):
            return None
        value = config.get(self.resource_key)
        return value if isinstance(value, str) and value else None


# Identity equality: grants are built once per token and compared as such.
@attrs.frozen(kw_only=True, eq=False)
class Grant:
    """What one authenticated connection may do; see the module docstring."""

    name: str
    _register: re.Pattern[str] | None = None
    _register_named: re.Pattern[str] | None = None
    _invoke: re.Pattern[str] | None = None
    _trigger_types: re.Pattern[str] | None = None
    # type(resource) entries: (type, resource regex, "*" among the patterns)
    _scoped: tuple[tuple[str, re.Pattern[str], bool], ...] = ()
    # False only for ALLOW_ALL (no tokens configured): nothing is enforced.
    authenticated: bool = True
    # True only for CLUSTER_PEER: another engine of this cluster (iii.cluster),
    # whose calls are served by this engine's own workers, never forwarded on.
    cluster_peer: bool = False

    @classmethod
    def from_patterns(
        cls,
        name: str,
        *,
        register: Sequence[str] = ("*",),
        invoke: Sequence[str] = ("*",),
        trigger_types: Sequence[str] = ("*",),
        authenticated: bool = True,
        cluster_peer: bool = False,
    ) -> Grant:
        bare: list[str] = []
        scoped: dict[str, list[str]] = {}
        for entry in trigger_types:
            trigger_type, pattern = parse_trigger_type_entry(entry)
            if pattern is None:
                bare.append(trigger_type)
            else:
                scoped.setdefault(trigger_type, []).append(pattern)
        named = [p for p in register if p != "*"]
        return cls(
            name=name,
            register=_compile(register),
            register_named=re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in named))
            if named
            else None,
            invoke=_compile(invoke),
            trigger_types=_compile(bare),
            scoped=tuple(
                (
                    trigger_type,
                    re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)),
                    "*" in patterns,
                )
                for trigger_type, patterns in scoped.items()
            ),
            authenticated=authenticated,
            cluster_peer=cluster_peer,
        )

    @property
    def unrestricted(self) -> bool:
        return self._register is None and self._invoke is None and self._trigger_types is None

    @property
    def invokes_everything(self) -> bool:
        return self._invoke is None

    # -- functions ------------------------------------------------------------------

    def may_register(self, function_id: str) -> bool:
        return _matches(self._register, function_id)

    def names(self, function_id: str) -> bool:
        """True if a ``register`` pattern other than the bare ``"*"`` matches."""
        if not self.authenticated:
            return True
        named = self._register_named
        return named is not None and named.match(function_id) is not None

    def may_invoke(self, function_id: str) -> bool:
        return function_id in ALWAYS_INVOKABLE or _matches(self._invoke, function_id)

    def require_invoke(self, function_id: str, *, what: str = "invoke") -> None:
        """Raise :class:`ForbiddenError` unless this grant may invoke ``function_id``."""
        if not self.may_invoke(function_id):
            raise ForbiddenError(f"token {self.name!r} may not {what} {function_id}")

    # -- trigger types ---------------------------------------------------------------

    def may_use_trigger_type(self, trigger_type: str) -> bool:
        """May bind or provide triggers of this type (a bare entry matches it)."""
        return _matches(self._trigger_types, trigger_type)

    def _scoped_entry(self, trigger_type: str) -> tuple[str, re.Pattern[str], bool] | None:
        for entry in self._scoped:
            if entry[0] == trigger_type:
                return entry
        return None

    def may_receive(self, trigger_type: str, resource: str | None, access: TriggerAccess) -> bool:
        """May a binding of a data-bearing type receive ``resource``'s data (None = all)?"""
        if access.read_function is not None:
            if self.may_invoke(access.read_function):
                return True
        elif self.invokes_everything:
            return True
        scoped = self._scoped_entry(trigger_type)
        if scoped is None:
            return False
        _, pattern, covers_all = scoped
        return covers_all if resource is None else pattern.match(resource) is not None

    def binding_refusal(
        self, trigger_type: str, function_id: str, config: Any, access: TriggerAccess | None
    ) -> str | None:
        """Why this grant may not bind the trigger, or None if it may."""
        if self._scoped_entry(trigger_type) is None and not self.may_use_trigger_type(trigger_type):
            return f"token {self.name!r} may not use trigger type {trigger_type}"
        if not self.may_invoke(function_id):
            return f"token {self.name!r} may not bind triggers to {function_id}"
        if access is None:
            return None
        for named in access.functions_named(config):
            if not self.may_invoke(named):
                return f"token {self.name!r} may not invoke {named!r} (named in the trigger config)"
        if not access.data:
            return None
        resource = access.resource(config)
        if self.may_receive(trigger_type, resource, access):
            return None
        what = "every resource" if resource is None else repr(resource)
        via = f"invoke {access.read_function} or " if access.read_function else "invoke [*] or "
        return (
            f"token {self.name!r} may not receive {trigger_type} data for {what}: "
            f"that needs {via}a trigger_types entry {trigger_type}(pattern) matching it"
        )


ALLOW_ALL = Grant.from_patterns("anonymous", authenticated=False)
# What a peer engine presenting the cluster token gets (iii.cluster).
CLUSTER_PEER = Grant.from_patterns("iii-cluster", cluster_peer=True)
