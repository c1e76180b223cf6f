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

Lifetime: an exchange lives as long as its request; its side tasks are
joined (or cancelled by :meth:`Exchange.stop`) before the request ends.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio

from iii.channels import Channel
from iii.errors import IIIError
from iii.grants import Grant
from iii.log import SNIPPET_CHARS, truncate
from iii.modules.rest_api.server import ClientGoneError, HttpRequest, Responder
from iii.modules.rest_api.side_tasks import SideTasks

if TYPE_CHECKING:
    from iii.channel_buffer import FrameReader, FrameWriter
    from iii.modules.rest_api.dispatch import RestDispatcher

__all__ = ["Exchange"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Exchange:
    """One routed request while its function runs.

    The request's task awaits the call itself.  Work on the channels starts
    only when the function's side claims them (``Channel.on_claim``): the
    body feeder when it opens ``request_body``, the response reader when it
    opens ``response``, each a side task (:mod:`.side_tasks`).  A function
    that just returns a value costs no extra task and no nursery.  Exactly
    one party owns the response (:meth:`take_answer`): the streamed answer
    if the function opened its response channel (:attr:`streaming`), else
    the call's value; or a failure that comes first (an error of the call,
    413, the deadline).  The others then stand down (:meth:`stop`).
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
    answered: bool = False  # the response belongs to whoever set this
    # The function opened its response channel: its answer is the streamed one.
    streaming: bool = False
    stopped: bool = False
    stream_done: trio.Event = attrs.field(factory=trio.Event)
    _waiting: trio.CancelScope | None = None  # the call's wait for a streamed answer
    client_gone: ClientGoneError | None = None

    def take_answer(self) -> bool:
        """Claim the response; False if another party already owns it."""
        if self.answered:
            return False
        self.answered = True
        return True

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
            if self.take_answer():
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
            if result is not None and not self.streaming:
                if self.take_answer():
                    await dispatcher._simple_response(self.responder, self.function_id, result)
                    self.stop()
                    return
            elif result is not None:
                log.debug(
                    "%s returned a value and streams its answer: the streamed one answers",
                    self.function_id,
                )
        # The answer comes (or came) through the response channel; the
        # request's deadline gives the 504 if it never does.
        with trio.CancelScope(deadline=self.deadline) as waiting:
            self._waiting = waiting
            await self.stream_done.wait()
        self._waiting = None
        if waiting.cancelled_caught:
            if self.take_answer():
                await dispatcher._timeout_response(self.responder, self.function_id)
            self.stop()

    def extend(self) -> None:
        """A body frame went out: the next one gets the full timeout again."""
        self.deadline = trio.current_time() + self.dispatcher.timeout
        self.side.extend(self.deadline)
        if self._waiting is not None:
            self._waiting.deadline = self.deadline

    # -- the response channel -----------------------------------------------------

    def on_response_claim(self, side: str) -> None:
        if side == "write" and not self.stopped:
            self.streaming = True
            self.side.start_soon(self._stream, self.response_channel.receive_side)

    async def _stream(self, frames: FrameReader) -> None:
        dispatcher = self.dispatcher
        responder = self.responder
        owner = False  # this task took the answer and sent the head
        try:
            async for frame in frames:
                if isinstance(frame, str):
                    self.status, self.headers = dispatcher._control(
                        self.function_id, frame, self.status, self.headers, owner
                    )
                    continue
                if not owner:
                    if not self.take_answer():
                        return  # a failure answered first
                    owner = True
                    await responder.start(self.status, self.headers)
                await responder.send(frame)
                self.extend()
            if not owner:
                if not self.take_answer():
                    return
                owner = True
                await responder.start(self.status, self.headers)
            await responder.end()
        except trio.ClosedResourceError:
            pass  # the channel was removed: the request is over
        except h11.LocalProtocolError as exc:
            # Bad headers from the function (500), or a body that does not fit
            # its own content-length (a started answer is cut off).  h11 quotes
            # the offending value whole: only a snippet of it is logged.
            problem = truncate(str(exc), SNIPPET_CHARS)
            if responder.started:
                log.warning("%s: streamed answer cut off: %s", self.function_id, problem)
            else:
                await dispatcher._internal_error(
                    responder, self.function_id, f"invalid streamed answer: {problem}"
                )
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
                    if self.take_answer() and not self.responder.started:
                        await self.responder.respond_error(
                            413, "PAYLOAD_TOO_LARGE", f"request body larger than {limit} bytes"
                        )
                    self.stop()  # a started answer is cut off: the connection closes
                    return
                await body_writer.send(chunk)
            body_writer.close()
        except ClientGoneError as exc:
            self.client_gone = exc
            self.stop()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the function's reader left; the server drains or closes
