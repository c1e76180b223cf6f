"""The engine's own liveness and readiness, as the metrics port answers them.

* ``/healthz``: the process is up and its event loop answers: always 200
  while the port serves, ``{"status": "ok"}``.
* ``/readyz``: 200 ``{"status": "ready", ...}`` once every module has
  started (each binds its listeners before it reports ready) and the worker
  port is bound (``engine.ready``); 503 with ``"starting"`` before that and
  ``"shutting_down"`` from the moment shutdown begins (intake stops), so a
  load balancer takes the engine out before it closes its ports.  The body
  also gives the modules, the worker port and the numbers of workers and
  functions.

Pure functions of the engine's state, no I/O (:mod:`.prometheus` serves them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Answer", "JSON", "liveness", "readiness"]

# status, content type, body
Answer = tuple[int, str, bytes]
JSON = "application/json"


def liveness(engine: Engine) -> Answer:
    return 200, JSON, orjson.dumps({"status": "ok"})


def readiness(engine: Engine) -> Answer:
    if engine.shutting_down.is_set():
        status, state = 503, "shutting_down"
    elif not engine.ready.is_set():
        status, state = 503, "starting"
    else:
        status, state = 200, "ready"
    body = {
        "status": state,
        "modules": sorted(engine.modules),
        "worker_port": engine.listen_port,
        "workers": len(engine.connections),
        "functions": len(engine.registry.functions),
    }
    return status, JSON, orjson.dumps(body)
