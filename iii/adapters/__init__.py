"""Adapters: the backends behind the modules, one package per kind.

Each ``iii/adapters/<kind>/`` package has:

* ``base.py``: the ``<Kind>Adapter`` Protocol and the kind's value types
  (what its backends import: no backend is imported there);
* one file per backend (``embedded.py``, ``redis.py``, ``rabbitmq.py`` …),
  each naming the frozen attrs ``Config`` class of its ``config`` block and
  declaring a factory with the one signature every kind shares::

      open_adapter(config: <Backend>Config, hooks: <Kind>Hooks)
          -> AbstractAsyncContextManager[<Backend>Adapter]

  ``hooks`` is what the backend may call back into its module: the
  peer-event handler (state, stream), the message handler (pubsub), or
  ``None`` (queue, cron);
* ``__init__.py``: the ``BACKENDS`` table (upstream class name →
  :class:`Backend`), the kind's :class:`~iii.config_schema.AdapterKind` and
  ``<Kind>AdapterRef`` (what a module's Config declares for its ``adapter``
  block), and ``open_<kind>_adapter(ref, hooks)``.

The table is built with :func:`backend`, so mypy checks, for every backend,
that its factory takes its own config class and that what it yields
satisfies the kind's Protocol (no duck typing of a module object at run
time).  The embedded backend is imported with its kind; the others (Redis,
RabbitMQ, Bridge: coredis alone takes about 0.3 s to import) only when a
config chooses them, through a typed opener in the kind's ``__init__``, so
their config classes live apart (:mod:`iii.adapters.settings`, and the
queue's ``base.py``) for the loader to read.  The embedded backend of every kind is named ``embedded`` (the file,
the class, and an accepted ``class:`` name; see :data:`~iii.config_schema.EMBEDDED`).

:mod:`iii.adapters.filelog` is the durable record log the file-based backends
share; :mod:`iii.adapters.kvstore` the embedded key-value store.  Pure
declarations here; an adapter's lifetime is its ``open_adapter`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

import attrs

from iii.config_schema import EMBEDDED, AdapterKind, AdapterRef

__all__ = ["Backend", "backend", "adapter_kind", "open_backend"]

C = TypeVar("C")
H = TypeVar("H")
A = TypeVar("A")


@attrs.frozen
class Backend(Generic[C, H, A]):
    """One backend of a kind: its config class and its factory."""

    config_type: type[C]
    open: Callable[[C, H], AbstractAsyncContextManager[A]]


def backend(
    config_type: type[C], open: Callable[[C, H], AbstractAsyncContextManager[A]]
) -> Backend[Any, H, A]:
    """A table entry; mypy checks ``open`` against ``config_type`` and the kind's Protocol ``A``."""
    return Backend(config_type, open)


def adapter_kind(
    name: str,
    backends: Mapping[str, Backend[Any, Any, Any]],
    default: str,
    aliases: Mapping[str, str] | None = None,
) -> AdapterKind:
    """The config file's view of a kind: its class names, their config classes, and
    ``embedded`` (plus any ``aliases``) standing for the ``default`` backend."""
    return AdapterKind(
        name=name,
        default=default,
        config_types={class_name: entry.config_type for class_name, entry in backends.items()},
        aliases={EMBEDDED: default, **(aliases or {})},
    )


def open_backend(
    backends: Mapping[str, Backend[Any, H, A]], ref: AdapterRef, hooks: H
) -> AbstractAsyncContextManager[A]:
    """Open the backend ``ref`` names, with the config the loader structured for it."""
    entry = backends[ref.class_name]
    if not isinstance(ref.config, entry.config_type):
        raise TypeError(
            f"{ref.class_name} takes a {entry.config_type.__name__}, "
            f"got {type(ref.config).__name__}"
        )
    return entry.open(ref.config, hooks)
