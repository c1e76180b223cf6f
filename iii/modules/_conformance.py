"""Static check, read by mypy only: every module class satisfies :class:`iii.modules.Module`.

The modules are loaded by name at run time (:data:`iii.modules.MODULE_SPECS`),
so nothing else would tell mypy that a module lacks ``statistics()`` or has
the wrong ``run`` signature.  Add a new module's class here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__: list[str] = []

if TYPE_CHECKING:
    from iii.modules import (
        Module,
        bridge_client,
        cron,
        exec,
        http_functions,
        kv_server,
        observability,
        pubsub,
        queue,
        rest_api,
        state,
        stream,
        telemetry,
        worker,
    )

    MODULE_CLASSES: tuple[type[Module], ...] = (
        worker.Module,
        telemetry.Module,
        rest_api.Module,
        queue.Module,
        cron.Module,
        stream.Module,
        state.Module,
        pubsub.Module,
        kv_server.Module,
        observability.Module,
        http_functions.Module,
        exec.Module,
        bridge_client.Module,
    )
