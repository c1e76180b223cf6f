"""What the storage modules (state, stream, kv_server) share for their functions.

* :func:`register_functions` files a module's functions under its prefix;
* :class:`Empty` is the input of a function that takes no keys (unknown keys
  are ignored, as everywhere);
* :func:`adapter_call` runs one backend operation and answers with the
  module's upstream error code (``SET_ERROR``, ``STREAM_GET_ERROR`` …) when
  the backend fails with anything but an :class:`~iii.errors.IIIError`
  (which already carries its code, e.g. ``adapter_unavailable``).

Lifetime: none (plain functions and a value type, no state, no tasks).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, TypeVar

import attrs

from iii.errors import IIIError
from iii.native import NativeHandler

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Empty", "adapter_call", "register_functions"]

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class Empty:
    pass


def register_functions(
    engine: Engine, prefix: str, functions: Iterable[tuple[str, NativeHandler, str]]
) -> None:
    """Register ``(name, handler, description)`` as ``<prefix><name>``."""
    for name, handler, description in functions:
        engine.register_function(f"{prefix}{name}", handler, description=description)


async def adapter_call(log: logging.Logger, code: str, operation: Awaitable[T]) -> T:
    """Await a backend operation; a failure that is not an IIIError becomes ``code``."""
    try:
        return await operation
    except IIIError:
        raise
    except Exception as exc:
        log.exception("adapter failed (%s)", code)
        raise IIIError(str(exc) or type(exc).__name__, code=code) from None
