"""JSON request bodies read whole, within the REST module's byte budget.

A JSON body is read into memory and parsed before its function is called
(:mod:`.dispatch`); every other body is streamed through a channel, which has
byte bounds of its own (:mod:`iii.channel_buffer`).  Without a bound,
``concurrency_request_limit`` x ``max_body_size`` bytes (1024 x 64 MiB) could
be held at once.  Here the bytes of the JSON bodies being read or served
count against the module's :class:`~iii.inbound.InboundBudget`
(``max_body_bytes_in_flight``), by the rule of :mod:`iii.inbound`:

* each request's first ``FREE_BYTES`` (64 KiB) are free: small bodies never
  wait, whatever large ones do;
* past those, each chunk takes room as it arrives, and the next chunk is
  not read until it has (backpressure: the rest waits in the kernel).  Room
  is counted as the bytes arrive, not reserved from ``Content-Length``: a
  client that announces 64 MiB and sends nothing holds nothing;
* the oldest body still arriving may go past the limit by one body
  (``max_body_size``), so bodies read at once never wait for each other;
* a request that is still waiting for room at its deadline
  (``default_timeout``) gets **503** ``SERVER_BUSY`` with ``Retry-After: 1``
  (:class:`NoRoomError`): the function was never called, and the client may
  try again.  Waiting, rather than refusing at once, serves a burst of
  uploads one after the other as room comes back, at no memory cost (the
  bytes not read stay in the socket buffers), as ``concurrency_request_limit``
  makes requests wait; the deadline bounds the wait as it bounds the rest of
  the request.

The body's bytes are given back when its request ends (the parsed body lives
as long as the call): the caller closes the account.  What the parsed form
takes in memory (a list of small numbers takes several times its text) is
not counted: it is bounded per body by ``max_body_size``.

Lifetime: nothing here owns a task; an account lives as long as its request.
"""

from __future__ import annotations

import math

import trio

from iii.inbound import InboundAccount
from iii.modules.rest_api.protocol import BodyTooLargeError, HttpRequest

__all__ = ["FREE_BYTES", "NoRoomError", "BodyTimeoutError", "read_body"]

FREE_BYTES = 64 * 1024
RETRY_AFTER = b"1"


class NoRoomError(Exception):
    """The deadline passed while the body waited for room (answer 503)."""


class BodyTimeoutError(Exception):
    """The deadline passed while the client was sending its body (answer 504)."""


async def read_body(
    request: HttpRequest, account: InboundAccount, *, limit: int, deadline: float
) -> bytes:
    """The whole body, counted in ``account``; raises :class:`BodyTooLargeError`
    past ``limit`` bytes, :class:`NoRoomError` or :class:`BodyTimeoutError` at
    ``deadline``."""
    parts: list[bytes] = []
    total = 0
    waiting = False
    with trio.move_on_at(deadline):
        while (chunk := await request.receive()) is not None:
            total += len(chunk)
            if total > limit:
                raise BodyTooLargeError(f"request body larger than {limit} bytes")
            parts.append(chunk)
            waiting = True
            # (Returns at once while there is room; the deadline above ends a wait.)
            await account.add(len(chunk), deadline=math.inf)
            waiting = False
        account.message_done()
        return b"".join(parts)
    if waiting:
        raise NoRoomError()
    raise BodyTimeoutError()
