"""Adapters: the backends behind the modules, one package per kind.

Each ``iii/adapters/<kind>/`` package declares the ``<Kind>Adapter`` Protocol
and ``open_<kind>_adapter(cfg)``; each backend is one file beside it
(``memory.py``, ``redis.py``, ``rabbitmq.py`` …).  :mod:`iii.adapters.filelog`
is the durable record log that the file-based backends share.

:func:`import_backend` is the lookup every ``open_<kind>_adapter`` shares: an
upstream adapter class name goes through the kind's explicit ``BACKENDS``
table (never an import string from the config file) to its module, imported
only when configured.  Pure lookup; the adapters' lifetimes belong to their
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

__all__ = ["import_backend"]


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
