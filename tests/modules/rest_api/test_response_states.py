"""The two state machines of a response: the Responder's (ResponseState) and
who owns the answer of a routed request (Answer, through claimable()).

The protocol is driven here by two plain callables, as the sans-I/O
:class:`~iii.modules.rest_api.protocol.HttpConnection` is meant to be: bytes
in from a memory channel, bytes out into a list, parsed back with a
client-side h11.  A move a machine does not have must raise
``IllegalTransitionError``, and must change nothing on the wire.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
import trio

from iii.modules.rest_api.exchange import Answer, claimable
from iii.modules.rest_api.protocol import (
    ClientGoneError,
    HttpConnection,
    HttpRequest,
    IllegalTransitionError,
    Responder,
    ResponseState,
)

App = Callable[[HttpRequest, Responder], Awaitable[None]]
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


async def serve(app: App, *requests: bytes, fail_sends: bool = False) -> tuple[list[Any], bool]:
    """Serve ``requests`` (then the end of the stream) to ``app`` on one connection.

    Returns the client's h11 events and whether the server read the end of
    the stream (False: it ended the connection itself, as after a response
    cut off, which it reports with ClientGoneError for the transport's log)."""
    incoming_send, incoming = trio.open_memory_channel[bytes](math.inf)
    for data in requests:
        incoming_send.send_nowait(data)
    incoming_send.close()
    out: list[bytes] = []
    read_eof = False

    async def receive() -> bytes:
        nonlocal read_eof
        try:
            return await incoming.receive()
        except trio.EndOfChannel:
            read_eof = True
            return b""

    async def send(data: bytes) -> None:
        if fail_sends:
            raise trio.BrokenResourceError("the client left")
        out.append(data)

    connection = HttpConnection(app, receive, send, "memory")
    with trio.fail_after(5):
        try:
            await connection.serve()
        except ClientGoneError:
            pass
    client = h11.Connection(h11.CLIENT)
    client.receive_data(b"".join(out))
    client.receive_data(b"")
    events: list[Any] = []
    for _ in requests:
        client.send(h11.Request(method="GET", target="/x", headers=[("host", "t")]))
        client.send(h11.EndOfMessage())
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:  # cut off mid-response
                return events, read_eof
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return events, read_eof
            events.append(event)
            if isinstance(event, h11.EndOfMessage):
                break
        client.start_next_cycle()
    return events, read_eof


def statuses(events: list[Any]) -> list[int]:
    return [e.status_code for e in events if isinstance(e, h11.Response)]


async def test_a_streamed_response_walks_the_states_in_order() -> None:
    seen: list[ResponseState] = []

    async def app(request: HttpRequest, responder: Responder) -> None:
        seen.append(responder.state)
        await responder.start(200, [(b"content-type", b"text/plain")])
        seen.append(responder.state)
        await responder.send(b"a")
        await responder.send(b"b")
        seen.append(responder.state)
        await responder.end()
        seen.append(responder.state)

    events, read_eof = await serve(app, GET, GET)
    assert (
        seen
        == [
            ResponseState.NOT_STARTED,
            ResponseState.HEAD_SENT,
            ResponseState.BODY_STREAMING,
            ResponseState.DONE,
        ]
        * 2
    )
    assert statuses(events) == [200, 200]  # DONE: the connection carried the second one
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"abab"
    assert read_eof


async def test_a_second_answer_is_refused_and_nothing_more_is_sent() -> None:
    refused: list[str] = []

    async def app(request: HttpRequest, responder: Responder) -> None:
        await responder.respond(200, [], b"first")
        for second in (
            lambda: responder.respond(500, [], b"second"),
            lambda: responder.start(500, []),
            lambda: responder.send(b"more"),
            lambda: responder.end(),
        ):
            with pytest.raises(IllegalTransitionError) as caught:
                await second()
            refused.append(str(caught.value))
        assert responder.state is ResponseState.DONE and responder.status == 200

    events, read_eof = await serve(app, GET, GET)
    assert len(refused) == 8 and all(text.startswith("response: done -> ") for text in refused)
    assert statuses(events) == [200, 200]
    assert [e.data for e in events if isinstance(e, h11.Data)] == [b"first", b"first"]
    assert read_eof


@pytest.mark.parametrize("misuse", ["send", "end"])
async def test_a_body_or_an_end_before_the_head_is_a_bug_answered_500(misuse: str) -> None:
    async def app(request: HttpRequest, responder: Responder) -> None:
        if misuse == "send":
            await responder.send(b"body first")
        else:
            await responder.end()

    events, _ = await serve(app, GET)
    assert statuses(events) == [500]  # the state was left NOT_STARTED: the error can go out
    assert b"body first" not in b"".join(e.data for e in events if isinstance(e, h11.Data))


async def test_invalid_headers_leave_the_response_unstarted() -> None:
    states: list[ResponseState] = []

    async def app(request: HttpRequest, responder: Responder) -> None:
        with pytest.raises(h11.LocalProtocolError):
            await responder.start(200, [(b"x-bad", b"line\r\nbreak")])
        states.append(responder.state)
        await responder.respond_error(500, "INTERNAL_ERROR", "bad headers")

    events, _ = await serve(app, GET)
    assert states == [ResponseState.NOT_STARTED]
    assert statuses(events) == [500]


async def test_a_response_left_unfinished_ends_the_connection() -> None:
    async def app(request: HttpRequest, responder: Responder) -> None:
        await responder.start(200, [])
        await responder.send(b"partial")

    events, read_eof = await serve(app, GET, GET)
    assert statuses(events) == [200]  # the second request is never answered
    assert not read_eof


async def test_abort_is_final_and_closes_the_connection() -> None:
    refused: list[str] = []

    async def app(request: HttpRequest, responder: Responder) -> None:
        await responder.start(200, [])
        responder.abort()
        with pytest.raises(IllegalTransitionError) as caught:
            await responder.send(b"after")
        refused.append(str(caught.value))

    events, read_eof = await serve(app, GET, GET)
    assert refused == ["response: aborted -> body streaming"]
    assert statuses(events) == [200] and not read_eof


async def test_a_send_the_client_does_not_take_aborts_the_response() -> None:
    states: list[ResponseState] = []

    async def app(request: HttpRequest, responder: Responder) -> None:
        try:
            await responder.respond(200, [], b"lost")
        finally:
            states.append(responder.state)

    await serve(app, GET, fail_sends=True)
    assert states == [ResponseState.ABORTED]


# -- who owns the answer ---------------------------------------------------------

LEGAL = {
    (Answer.UNCLAIMED, Answer.CHANNEL_OPENED),
    (Answer.UNCLAIMED, Answer.VALUE),
    (Answer.UNCLAIMED, Answer.FAILURE),
    (Answer.CHANNEL_OPENED, Answer.STREAM),
    (Answer.CHANNEL_OPENED, Answer.FAILURE),
}
FINAL = {Answer.VALUE, Answer.STREAM, Answer.FAILURE}


@pytest.mark.parametrize(
    ("current", "wanted"), list(itertools.product(Answer, Answer)), ids=lambda a: a.name
)
def test_every_claim_is_granted_lost_or_a_bug(current: Answer, wanted: Answer) -> None:
    if current in FINAL:
        assert claimable(current, wanted) is False  # a race lost: the owner stays
    elif (current, wanted) in LEGAL:
        assert claimable(current, wanted) is True
    else:
        # A value after the channel opened, a stream without a channel, a
        # claim of nobody: bugs in the caller, not races.
        with pytest.raises(
            IllegalTransitionError, match=f"answer: {current.value} -> {wanted.value}"
        ):
            claimable(current, wanted)
