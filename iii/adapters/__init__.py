"""Adapters: the backends behind the modules, one package per kind.

Each ``iii/adapters/<kind>/`` package declares the ``<Kind>Adapter`` Protocol
and ``open_<kind>_adapter(cfg)``; each backend is one file beside it
(``memory.py``, ``redis.py``, ``rabbitmq.py`` …).  :mod:`iii.adapters.filelog`
is the durable record log that the file-based backends share.

:func:`import_backend` is the lookup every ``open_<kind>_adapter`` shares: an
upstream adapter class name goes through the kind's explicit ``BACKENDS``
table (never an import string from the config file) to its module, imported
only when configured.  :func:`typed_keys` reads the typed keys of a raw
backend config.  Pure functions; the adapters' lifetimes belong to their
``open_adapter`` context managers.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from iii.errors import ConfigError

if TYPE_CHECKING:
    from iii.config import AdapterRef

__all__ = ["import_backend", "typed_keys"]


def import_backend(
    kind: str, backends: Mapping[str, str], ref: AdapterRef | None, default: str, *, key: str
) -> tuple[ModuleType, Any]:
    """The backend module for ``ref`` (``default`` when absent) and its raw config.

    An unknown class name is a :class:`~iii.errors.ConfigError` at ``key``
    listing the available ones.
    """
    class_name = ref.class_name if ref is not None else default
    module_name = backends.get(class_name)
    if module_name is None:
        raise ConfigError(
            f"{kind} adapter factory '{class_name}' not found; "
            f"available: {', '.join(sorted(backends))}",
            key=key,
        )
    return importlib.import_module(module_name), (ref.config if ref is not None else None)


def typed_keys(raw: Any, *, where: str, fields: tuple[tuple[str, type], ...]) -> dict[str, Any]:
    """The keys of a raw backend config that are set, each checked for its type.

    ``raw`` is the JSON the config file gave (None = empty); other keys are
    ignored (upstream reads these blocks leniently).  A value of the wrong
    type (a bool is not an int) is a ConfigError at ``<where>.<key>``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {type(raw).__name__}", key=where)
    values: dict[str, Any] = {}
    for name, kind in fields:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(
                f"expected {kind.__name__}, got {type(value).__name__}", key=f"{where}.{name}"
            )
        values[name] = value
    return values
