"""What one write to a store may keep and answer, checked before anything changes.

A store write (``state::set``, ``stream::update``, ``kv_server::delete`` …)
either happens and is answered, or is refused and changes nothing.  Two
things could make it answer an error after the fact, so both are checked by
the backend inside its atomic step, once the sizes are known and before it
writes (issue 10 row 4):

* **The stored value**, encoded, must be at most ``max_value_bytes`` (the
  module's config key; upstream HEAD's name, answering ``VALUE_TOO_LARGE``).
  The default, :data:`DEFAULT_MAX_VALUE_BYTES` (16 MiB), is a quarter of the
  default ``max_message_size``: an update's answer and its trigger event each
  carry the old and the new value, so two values and their envelope must fit
  in one frame to a worker.
* **The answer** must fit the caller: a 0.4.1 worker takes frames of 1 MiB
  at most (``iii.worker_conn.LEGACY_FRAME_LIMIT``).  The answer carries the
  old value, the new one (set, update) and the op errors (update); if they
  would not fit the caller's frame (``CallContext.reply_limit``), the write
  is refused with ``payload_too_large`` and nothing is changed.

A backend calls :meth:`WriteLimits.check_write` / :meth:`~WriteLimits.check_delete`
with the encoded sizes it has at hand (the embedded store keeps values
encoded; Redis returns them as stored).

Lifetime: none: a value type built per call, and its errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import attrs
import orjson

from iii.config_schema import FieldValueError
from iii.errors import FrameTooLargeError, IIIError

if TYPE_CHECKING:
    from iii.native import CallContext
    from iii.update_ops import OpError

__all__ = [
    "WriteLimits",
    "NO_LIMITS",
    "ValueTooLargeError",
    "AnswerTooLargeError",
    "DEFAULT_MAX_VALUE_BYTES",
    "positive_bytes",
]

MiB = 1024 * 1024
DEFAULT_MAX_VALUE_BYTES: Final = 16 * MiB
# The invocationresult around a store function's result, beyond the ids and
# trace fields counted one by one: {"type":…,"invocation_id":…,"result":
# {"old_value":…,"new_value":…,"errors":…}}.
_ANSWER_ENVELOPE: Final = 512


class ValueTooLargeError(IIIError):
    """A value larger than the store takes (``max_value_bytes``, or the file log's record)."""

    code = "VALUE_TOO_LARGE"


class AnswerTooLargeError(FrameTooLargeError):
    """The answer to a write would not fit the caller's frames: the write is refused."""


@attrs.frozen(kw_only=True)
class WriteLimits:
    max_value_bytes: int | None = None
    # What the old value, the new value and the op errors may take in the
    # answer, in bytes; None when the result does not go back over a socket.
    max_answer_bytes: int | None = None

    @classmethod
    def for_call(cls, max_value_bytes: int | None, ctx: CallContext) -> WriteLimits:
        """The limits of one store function call: the module's, and the caller's frames."""
        if ctx.reply_limit is None:
            return cls(max_value_bytes=max_value_bytes)
        ids = sum(
            len(orjson.dumps(text))
            for text in (ctx.function_id, ctx.traceparent, ctx.baggage)
            if text is not None
        )
        return cls(
            max_value_bytes=max_value_bytes,
            max_answer_bytes=max(0, ctx.reply_limit - _ANSWER_ENVELOPE - ids),
        )

    def check_value(self, new_bytes: int) -> None:
        if self.max_value_bytes is not None and new_bytes > self.max_value_bytes:
            raise ValueTooLargeError(
                f"value of {new_bytes} bytes exceeds the configured max_value_bytes limit "
                f"of {self.max_value_bytes}"
            )

    def check_write(
        self, *, old_bytes: int, new_bytes: int, errors: Sequence[OpError] = ()
    ) -> None:
        """Before a set or an update: the new value, and the answer {old, new, errors}."""
        self.check_value(new_bytes)
        if self.max_answer_bytes is None:
            return
        answer = old_bytes + new_bytes
        if errors:
            answer += len(orjson.dumps([e.to_json() for e in errors]))
        self._check_answer(answer)

    def check_delete(self, *, old_bytes: int) -> None:
        """Before a delete: the answer carries the removed value."""
        self._check_answer(old_bytes)

    def _check_answer(self, size: int) -> None:
        if self.max_answer_bytes is not None and size > self.max_answer_bytes:
            raise self.answer_refused(size)

    def answer_refused(self, size: int) -> AnswerTooLargeError:
        """The error for an answer of ``size`` bytes of values that the caller cannot take."""
        return AnswerTooLargeError(
            f"the answer would carry {size} bytes of values, more than this worker's "
            f"frames take ({self.max_answer_bytes} after the envelope): nothing was changed"
        )


NO_LIMITS: Final = WriteLimits()


def positive_bytes(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    """attrs validator of a size setting (the config loader names file and key)."""
    if value < 1:
        raise FieldValueError(attribute.name, f"must be a positive number of bytes, got {value}")
