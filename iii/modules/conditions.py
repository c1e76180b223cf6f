"""Trigger conditions: which function a trigger config names, and what its answer means.

Every module that runs a trigger's function on an event (REST routes, queue
and cron triggers, the state, stream and log change triggers) asks the same
two questions here, so they cannot disagree:

* :func:`condition_of`: the condition function a trigger config names.  The
  keys a trigger type accepts are its module's (``http``, ``queue`` and
  ``cron`` take ``condition_function_id`` and v0.4's ``_condition_path``,
  cron also ``condition``; the change triggers take ``condition_function_id``)
  and are the same keys its :class:`~iii.grants.TriggerAccess` checks against
  the registrant's grant.  A missing, null or empty value means no condition;
  anything else must be a string.  Two keys naming *different* functions are
  refused at registration: no key silently wins over another.
* :func:`condition_passes`: call it, under the caller's grant and trace.
  Only a JSON ``false`` skips the handler; ``true`` and any other value pass.
  A ``null`` (no result) passes for ``http``, ``queue`` and ``cron`` and skips
  for the change triggers (``null_passes``), as upstream v0.4 does per
  module (spec modules.md, behaviour 4).  An error is raised to the caller,
  whose module decides what a failed condition means (a 500, a skipped cron
  tick, a failed queue attempt, a skipped event).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from iii.errors import TriggerRegistrationError
from iii.log import RateLimitedLog

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["CONDITION_KEYS", "CHANGE_CONDITION_KEYS", "condition_of", "condition_passes"]

log = logging.getLogger(__name__)

# http, queue (and cron, which adds "condition"): the current key and v0.4's.
CONDITION_KEYS = ("condition_function_id", "_condition_path")
# state, stream and log change triggers.
CHANGE_CONDITION_KEYS = ("condition_function_id",)

# A condition answering null is the condition's author's mistake, not a peer's
# attack, but a worker can repeat it on every request: bounded.
_null_warnings = RateLimitedLog(log)


def condition_of(config: Any, what: str, keys: tuple[str, ...] = CONDITION_KEYS) -> str | None:
    """The condition function ``config`` names under ``keys``, or None.

    Raises :class:`TriggerRegistrationError` (``what`` names the trigger type)
    for a value that is not a string, or for keys that name different functions.
    """
    if not isinstance(config, dict):
        return None
    named: dict[str, str] = {}
    for key in keys:
        value = config.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise TriggerRegistrationError(f"{what} trigger {key} must be a function id (a string)")
        named[key] = value
    if len(set(named.values())) > 1:
        listed = " and ".join(named)
        raise TriggerRegistrationError(
            f"{what} trigger: {listed} name different condition functions; give one"
        )
    return next(iter(named.values()), None)


async def condition_passes(
    engine: Engine,
    condition_id: str,
    data: Any,
    *,
    null_passes: bool,
    what: str,
    **invoke: Any,
) -> bool:
    """Call the condition; True when the handler should run.

    ``invoke`` goes to :meth:`Engine.invoke` (``grant``, ``traceparent``,
    ``baggage``, ``timeout`` ...).  A failed call raises its
    :class:`~iii.errors.IIIError`.
    """
    verdict = await engine.invoke(condition_id, data, **invoke)
    if verdict is False:
        return False
    if verdict is None:
        if null_passes:
            _null_warnings.warning(
                "%s condition %s returned null: the handler runs", what, condition_id
            )
        return null_passes
    return True
