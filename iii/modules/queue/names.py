"""How the queue module names its adapter queues (a leaf: every file of the
package may import it, so none has to import the package ``__init__``).

A topic's jobs are in the adapter queue named by the topic; a function
queue ``Q`` (``invokefunction`` with ``action: {type: "enqueue", queue: Q}``)
is kept apart, in the adapter queue ``@Q``.
"""

from __future__ import annotations

__all__ = ["FUNCTION_QUEUE_PREFIX"]

FUNCTION_QUEUE_PREFIX = "@"
