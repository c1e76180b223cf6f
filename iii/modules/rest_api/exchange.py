"""One routed request while its function runs: who answers, and the two channels.

The request's task awaits the call itself (:meth:`Exchange.call`).  Work on
the channels starts only when the function's side claims them
(``Channel.on_claim``): the body feeder when it opens ``request_body``, the
response reader when it opens ``response``, each a side task
(:mod:`.side_tasks`).  The dispatcher (:mod:`.dispatch`) builds the answers
themselves.

Who answers, deterministically:

* a function that opened its response channel answers through it: the
  streamed status, headers and body, sent when its first body frame or its
  close arrives.  A value it also returns is not an answer (a Motia step on
  ``iii-sdk`` 0.9.0 streams its answer *and* returns it: see the README,
  "What iii-sdk 0.9.0 sends").  The channel is claimed before the worker's
  upgrade is answered, so before any value the function sends afterwards can
  arrive: which socket the engine reads first does not matter;
* otherwise the returned value answers (``{status_code, body, headers}``);
* a failure answers if nothing was sent yet (500, 504, 413), and cuts off a
  started answer otherwise.

That rule is a state machine, :class:`Answer`, and :meth:`Exchange.claim`
is the one place it moves: UNCLAIMED -> CHANNEL_OPENED (the function opened
its response channel) -> STREAM (its first body frame or its close), or
UNCLAIMED -> VALUE, or FAILURE from either of the first two.  A claim that
comes after a final owner is a race lost (False: stand down); a move the
machine does not have is a bug (``IllegalTransitionError``).  What goes on
the wire once owned is the Responder's own machine (:class:`.protocol.ResponseState`).

Lifetime: an exchange lives as long as its request; its side tasks are
joined (or cancelled by :meth:`Exchange.stop`) before the request ends,
and the request waits for them under its one deadline.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio

from iii.channels import Channel
from iii.errors import IIIError
from iii.grants import Grant
from iii.log import SNIPPET_CHARS, truncate
from iii.modules.rest_api.protocol import (
    ClientGoneError,
    HttpRequest,
    IllegalTransitionError,
    Responder,
    ResponseState,
)
from iii.modules.rest_api.side_tasks import SideTasks

if TYPE_CHECKING:
    from iii.channel_buffer import FrameReader, FrameWriter
    from iii.modules.rest_api.dispatch import RestDispatcher

__all__ = ["Exchange", "Answer", "claimable"]

log = logging.getLogger(__name__)


class Answer(enum.Enum):
    """Who owns the response of a routed request (:meth:`Exchange.claim`).

    UNCLAIMED -> CHANNEL_OPENED -> STREAM, and UNCLAIMED -> VALUE; FAILURE
    from either of the first two.  VALUE, STREAM and FAILURE are final.
    """

    UNCLAIMED = "unclaimed"  # the returned value would answer
    # The function opened its response channel: its frames will answer (a
    # returned value no longer does), unless a failure comes first.
    CHANNEL_OPENED = "channel opened"
    VALUE = "value"  # the returned value answers
    STREAM = "stream"  # the channel's frames answer: the head is on its way
    FAILURE = "failure"  # an error answers (500, 504, 413), or cuts a response off


_CLAIMS: dict[Answer, frozenset[Answer]] = {
    Answer.UNCLAIMED: frozenset({Answer.CHANNEL_OPENED, Answer.VALUE, Answer.FAILURE}),
    Answer.CHANNEL_OPENED: frozenset({Answer.STREAM, Answer.FAILURE}),
    Answer.VALUE: frozenset(),
    Answer.STREAM: frozenset(),
    Answer.FAILURE: frozenset(),
}
_FINAL = frozenset({Answer.VALUE, Answer.STREAM, Answer.FAILURE})


def claimable(current: Answer, wanted: Answer) -> bool:
    """Whether ``wanted`` may take the response from ``current``.

    False when a final owner has it (a race lost, which is normal);
    :class:`IllegalTransitionError` for a move :class:`Answer` does not have.
    """
    if current in _FINAL:
        return False
    if wanted not in _CLAIMS[current]:
        raise IllegalTransitionError(f"answer: {current.value} -> {wanted.value}")
    return True


@attrs.define(eq=False)
class Exchange:
    """One routed request while its function runs.

    The request's task awaits the call itself.  Work on the channels starts
    only when the function's side claims them (``Channel.on_claim``): the
    body feeder when it opens ``request_body``, the response reader when it
    opens ``response``, each a side task (:mod:`.side_tasks`).  A function
    that just returns a value costs no extra task and no nursery.

    Exactly one party owns the response, and :meth:`claim` is the only
    place that gives it (:class:`Answer`): the streamed answer if the
    function opened its response channel, else the call's value; or a
    failure that comes first (an error of the call, 413, the deadline).
    The others then stand down (:meth:`stop`).

    One deadline, :attr:`deadline`: it bounds the call and the wait for a
    streamed answer, and each body frame that goes out moves it
    (:meth:`extend`).  The side tasks have none of their own: the request's
    task waits for them under it, and cancels them when it passes.
    """

    dispatcher: RestDispatcher
    request: HttpRequest
    responder: Responder
    function_id: str
    grant: Grant | None  # the route's registrants' token
    invocation_id: str
    deadline: float  # for the response head, then for each gap in a streamed body
    side: SideTasks
    request_channel: Channel  # the engine writes the body (if streamed)
    response_channel: Channel  # the engine reads a streamed answer
    body_streamed: bool  # False: the body went into the payload, or there is none
    status: int = 200
    headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    answer: Answer = Answer.UNCLAIMED
    stopped: bool = False  # the exchange is over: nothing more starts
    stream_done: trio.Event = attrs.field(factory=trio.Event)
    _waiting: trio.CancelScope | None = None  # the request's wait, under the deadline
    client_gone: ClientGoneError | None = None

    def claim(self, owner: Answer) -> bool:
        """Take the response for ``owner``; False if a final owner has it already.

        The only place the owner changes.  A move :class:`Answer` does not
        have (a value after the channel opened, a stream without a channel)
        raises :class:`IllegalTransitionError`: that is a bug, not a race.
        """
        if not claimable(self.answer, owner):
            return False
        self.answer = owner
        return True

    def attach(self) -> None:
        """Serve each channel once the function's side claims it."""
        self.request_channel.on_claim = self.on_request_claim
        self.response_channel.on_claim = self.on_response_claim

    def detach(self) -> None:
        """No more side tasks start (a claim from now on is left unserved)."""
        self.request_channel.on_claim = self.response_channel.on_claim = None

    def stop(self) -> None:
        """The request is over (answered, failed, or its client left).

        The side tasks are cancelled, and a call still waiting for the
        function stops waiting (the function itself runs on: the engine
        cannot take back an invocation it sent).
        """
        self.stopped = True
        self.side.cancel()
        self.stream_done.set()
        self.dispatcher.engine.pending.abandon(self.invocation_id)

    # -- the call (the request's own task) ----------------------------------------

    async def call(
        self, payload: dict[str, Any], traceparent: str | None = None, baggage: str | None = None
    ) -> None:
        dispatcher = self.dispatcher
        try:
            result = await dispatcher.engine.invoke(
                self.function_id,
                payload,
                invocation_id=self.invocation_id,
                timeout=max(0.0, self.deadline - trio.current_time()),
                traceparent=traceparent,
                baggage=baggage,
                grant=self.grant,
            )
        except IIIError as exc:
            if self.claim(Answer.FAILURE):
                await dispatcher._error_response(self.responder, exc, self.function_id)
                self.stop()
                return
            if not self.stopped:
                log.warning(
                    "%s failed while its answer streamed: %s: %s",
                    self.function_id,
                    exc.code,
                    exc.message,
                )
        else:
            if result is not None and self.answer is Answer.UNCLAIMED:
                if self.claim(Answer.VALUE):
                    await dispatcher._simple_response(self.responder, self.function_id, result)
                    self.stop()
                    return
            elif result is not None and self.answer is not Answer.FAILURE:
                log.debug(
                    "%s returned a value and streams its answer: the streamed one answers",
                    self.function_id,
                )
        # The answer comes (or came) through the response channel; the
        # deadline gives the 504 if it never does.  The side tasks are
        # waited for under the same deadline (a body feeder may still run).
        with trio.CancelScope(deadline=self.deadline) as waiting:
            self._waiting = waiting
            await self.stream_done.wait()
            self.detach()
            await self.side.join()
        self._waiting = None
        if waiting.cancelled_caught:
            if self.claim(Answer.FAILURE):
                await dispatcher._timeout_response(self.responder, self.function_id)
            self.stop()

    def extend(self) -> None:
        """A body frame went out: the next one gets the full timeout again."""
        self.deadline = trio.current_time() + self.dispatcher.timeout
        if self._waiting is not None:  # the one scope that enforces it
            self._waiting.deadline = self.deadline

    # -- the response channel -----------------------------------------------------

    def on_response_claim(self, side: str) -> None:
        if side == "write" and not self.stopped and self.claim(Answer.CHANNEL_OPENED):
            self.side.start_soon(self._stream, self.response_channel.receive_side)

    async def _stream(self, frames: FrameReader) -> None:
        dispatcher = self.dispatcher
        responder = self.responder
        try:
            async for frame in frames:
                if isinstance(frame, str):
                    self.status, self.headers = dispatcher._control(
                        self.function_id,
                        frame,
                        self.status,
                        self.headers,
                        self.answer is Answer.STREAM,
                    )
                    continue
                if self.answer is not Answer.STREAM:
                    if not self.claim(Answer.STREAM):
                        return  # a failure answered first
                    await responder.start(self.status, self.headers)
                await responder.send(frame)
                self.extend()
            if self.answer is not Answer.STREAM:
                if not self.claim(Answer.STREAM):
                    return
                await responder.start(self.status, self.headers)
            await responder.end()
        except trio.ClosedResourceError:
            pass  # the channel was removed: the request is over
        except h11.LocalProtocolError as exc:
            # Bad headers from the function (500), or a body that does not fit
            # its own content-length (a started answer is cut off).  h11 quotes
            # the offending value whole: only a snippet of it is logged.
            problem = truncate(str(exc), SNIPPET_CHARS)
            if responder.state is ResponseState.NOT_STARTED:
                await dispatcher._internal_error(
                    responder, self.function_id, f"invalid streamed answer: {problem}"
                )
            else:
                log.warning("%s: streamed answer cut off: %s", self.function_id, problem)
                responder.abort()
            self.stop()
        except ClientGoneError as exc:
            self.client_gone = exc
            self.stop()
        finally:
            self.stream_done.set()

    # -- the request body -----------------------------------------------------------

    def on_request_claim(self, side: str) -> None:
        if side != "read":
            return
        body_writer = self.request_channel.send_side
        if self.body_streamed and not self.stopped:
            self.side.start_soon(self._feed_body, body_writer)
        else:
            body_writer.close()  # the reader gets the end of stream at once

    async def _feed_body(self, body_writer: FrameWriter) -> None:
        """Stream the request body into the channel while the function runs."""
        limit = self.dispatcher.max_body_size
        total = 0
        try:
            while (chunk := await self.request.receive()) is not None:
                total += len(chunk)
                if total > limit:
                    if self.claim(Answer.FAILURE):  # else a started answer is cut off
                        await self.responder.respond_error(
                            413, "PAYLOAD_TOO_LARGE", f"request body larger than {limit} bytes"
                        )
                    self.stop()
                    return
                await body_writer.send(chunk)
            body_writer.close()
        except ClientGoneError as exc:
            self.client_gone = exc
            self.stop()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the function's reader left; the server drains or closes
