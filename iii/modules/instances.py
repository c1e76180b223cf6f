"""Names for the entries of a module that may be listed several times (exec, bridge_client).

:func:`unique_names`: a name given in the config must be unique among the
module's entries (else a config error naming both entries); an entry without
one gets a default derived from its config, made unique with ``-2``, ``-3``
...  The engine keys the module instances by these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs

from iii.errors import ConfigError

__all__ = ["unique_names"]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


C = TypeVar("C", bound=_Named)


def unique_names(
    configs: list[C],
    *,
    what: str,
    default_name: Callable[[C], str],
    file: str | None,
    keys: list[str],
) -> list[C]:
    """``configs`` with every ``name`` set and unique; ``what`` names an entry in
    errors ("exec pipelines"), ``keys`` locate each entry in the file."""
    taken: dict[str, int] = {}
    for index, config in enumerate(configs):
        if not config.name:
            continue
        if config.name in taken:
            raise ConfigError(
                f"two {what} are named {config.name!r} (also {keys[taken[config.name]]})",
                file=file,
                key=f"{keys[index]}.name",
            )
        taken[config.name] = index
    named = []
    for index, config in enumerate(configs):
        if not config.name:
            base = default_name(config)
            name, suffix = base, 2
            while name in taken:
                name, suffix = f"{base}-{suffix}", suffix + 1
            taken[name] = index
            evolved: Any = attrs.evolve(config, name=name)  # type: ignore[misc]
            config = evolved
        named.append(config)
    return named
