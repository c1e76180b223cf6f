"""iii: a backend orchestration engine on trio, wire-compatible with the official iii SDKs.

The public API is the embedding API (:mod:`iii.embedding`): build an engine
in a program or a test suite and run it on trio.  The names below are
imported on first use, so ``import iii`` (and ``python -m iii``) stays cheap.
Everything not listed in ``__all__`` is private to the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "EngineBuilder",
    "RunningEngine",
    "EngineThread",
    "EnginePorts",
    "FunctionHandler",
    "CallContext",
    "Trigger",
    "TriggerTypeHandler",
    "IIIError",
    "ConfigError",
    "__version__",
]

_LAZY = {
    "EngineBuilder": "iii.embedding",
    "RunningEngine": "iii.embedding",
    "EnginePorts": "iii.embedding",
    "FunctionHandler": "iii.embedding",
    "Trigger": "iii.embedding",
    "TriggerTypeHandler": "iii.embedding",
    "EngineThread": "iii.embedding",
    "CallContext": "iii.native",
    "IIIError": "iii.errors",
    "ConfigError": "iii.errors",
}

if TYPE_CHECKING:
    from iii.embedding import (
        EngineBuilder,
        EnginePorts,
        EngineThread,
        FunctionHandler,
        RunningEngine,
        Trigger,
        TriggerTypeHandler,
    )
    from iii.errors import ConfigError, IIIError
    from iii.native import CallContext


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'iii' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
