"""The h11 connection loop on its own: keep-alive, pipelining, bad requests,
bodies read on demand, graceful drain.  One real loopback socket per test."""

from __future__ import annotations

import socket

import h11
import httpx
import pytest
import trio

from iii.modules.rest_api.server import HttpRequest, HttpServer, Responder


async def echo_app(request: HttpRequest, responder: Responder) -> None:
    body = await request.read_all(1 << 20)
    text = f"{request.method} {request.path} {request.query} {len(body)} {request.peer}".encode()
    await responder.respond(200, [(b"content-type", b"text/plain")], text)


class NoDelayServer(HttpServer):
    """Records TCP_NODELAY of each socket it serves (the protocol sees no socket)."""

    nodelay: list[int]

    async def serve_stream(self, stream: trio.abc.Stream, peer: str = "") -> None:
        assert isinstance(stream, trio.SocketStream)
        self.nodelay.append(stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await super().serve_stream(stream, peer)


async def start(nursery: trio.Nursery, app=echo_app) -> NoDelayServer:
    server = NoDelayServer(app)
    server.nodelay = []
    await nursery.start(server.serve, "127.0.0.1", 0)
    return server


async def read_responses(stream: trio.SocketStream, count: int) -> list[tuple[int, bytes, list]]:
    """Parse ``count`` responses off a raw socket with a client-side h11."""
    client = h11.Connection(h11.CLIENT)
    # Tell the client-side machine about the requests we sent by hand.
    responses = []
    for _ in range(count):
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, [], b""
        with trio.fail_after(5):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, event.headers
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        responses.append((status, body, headers))
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
    return responses


async def test_pipelined_requests_are_answered_in_order_on_one_connection():
    async with trio.open_nursery() as nursery:
        server = await start(nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(
            b"GET /first?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        responses = await read_responses(stream, 3)
        bodies = [body.decode().split() for _, body, _ in responses]
        assert [b[1] for b in bodies] == ["/first", "/second", "/third"]
        assert bodies[0][2] == "a=1"
        assert len({b[-1] for b in bodies}) == 1  # the same peer: one connection
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_keep_alive_reuses_the_connection():
    async with trio.open_nursery() as nursery:
        server = await start(nursery)
        async with httpx.AsyncClient() as client:
            peers = set()
            for i in range(5):
                response = await client.post(
                    f"http://127.0.0.1:{server.port}/p{i}", content=b"x" * i
                )
                method, path, _query, size, peer = response.text.split(" ")
                assert (method, path, int(size)) == ("POST", f"/p{i}", i)
                peers.add(peer)
        assert len(peers) == 1
        assert len(server.nodelay) == 1 and server.nodelay[0] != 0  # TCP_NODELAY on accept
        nursery.cancel_scope.cancel()


async def test_malformed_request_gets_json_400_and_close():
    async with trio.open_nursery() as nursery:
        server = await start(nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert b'"code":"BAD_REQUEST"' in body
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_unread_body_is_drained_so_the_connection_stays_usable():
    async def ignores_body(request: HttpRequest, responder: Responder) -> None:
        await responder.respond(200, [], request.path.encode())

    async with trio.open_nursery() as nursery:
        server = await start(nursery, ignores_body)
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{server.port}"
            assert (await client.post(url + "/a", content=b"z" * 10_000)).text == "/a"
            assert (await client.post(url + "/b", content=b"z" * 10)).text == "/b"
        nursery.cancel_scope.cancel()


async def test_app_error_is_a_json_500():
    async def broken(request: HttpRequest, responder: Responder) -> None:
        raise ValueError("bug")

    async with trio.open_nursery() as nursery:
        server = await start(nursery, broken)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/")
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "INTERNAL_ERROR"
        nursery.cancel_scope.cancel()


async def test_drain_finishes_requests_in_flight_then_stops():
    entered = trio.Event()
    release = trio.Event()

    async def slow(request: HttpRequest, responder: Responder) -> None:
        entered.set()
        await release.wait()
        await responder.respond(200, [], b"finished")

    server = HttpServer(slow)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", 0)
        port = server.port
        idle = await trio.open_tcp_stream("127.0.0.1", port)  # connected, no request
        result = []

        async def request() -> None:
            async with httpx.AsyncClient() as client:
                result.append(await client.get(f"http://127.0.0.1:{port}/"))

        nursery.start_soon(request)
        await entered.wait()
        server.begin_drain()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await idle.receive_some(10) == b""  # the idle connection was closed
        await idle.aclose()
        release.set()
    # serve() returned by itself once the last connection ended
    assert result[0].text == "finished"
    assert result[0].headers["connection"] == "close"


# -- request smuggling (issue 10 row 11): refused once, then the connection closes ---------

PIPELINED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

SMUGGLING = {
    "content-length and transfer-encoding": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "transfer-encoding then content-length": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "bare LF line endings": (b"GET /a HTTP/1.1\nHost: x\n\n", 400),
    "one bare LF among CRLFs": (b"GET /a HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", 400),
    "HTTP/0.9 request line": (b"GET /a\r\n\r\n", 400),
    "HTTP/2.0 request line": (b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "HTTP/1.2 request line": (b"GET /a HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    "two different content-lengths": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),
    "obs-fold": (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "transfer-encoding Chunked": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "transfer-encoding xchunked": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        501,  # h11's answer, as RFC 9112 6.1 says, for a coding it does not know
    ),
    "transfer-encoding gzip, chunked": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "transfer-encoding in HTTP/1.0": (
        b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "whitespace before the colon": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\nab",
        400,
    ),
}


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


@pytest.mark.parametrize("attack", list(SMUGGLING))
async def test_smuggling_is_refused_once_and_the_connection_closed(attack):
    request, status = SMUGGLING[attack]
    seen = []

    async def app(request: HttpRequest, responder: Responder) -> None:
        seen.append(request.path)
        await request.read_all(1 << 20)
        await responder.respond(200, [], b"ok")

    async with trio.open_nursery() as nursery:
        server = await start(nursery, app)
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            await stream.send_all(request + PIPELINED)
            data = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:200]
    assert data.count(b"HTTP/1.1 ") == 1  # the pipelined request is never answered
    assert b"connection: close" in data.lower()
    assert seen == []  # the application never saw either request


async def test_strict_framing_still_serves_ordinary_requests():
    """Chunked bodies, HTTP/1.0, a repeated equal Content-Length and OWS stay accepted."""
    async with trio.open_nursery() as nursery:
        server = await start(nursery)
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            await stream.send_all(
                b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"
                b"POST /twice HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n"
                b"ab"
                b"GET /ows HTTP/1.1\r\nHost:   x  \r\nTransfer-Encoding:  chunked \r\n\r\n0\r\n\r\n"
                b"GET /old HTTP/1.0\r\n\r\n"
            )
            data = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    assert data.count(b"HTTP/1.1 200 ") == 4, data
    for body in (b"POST /chunked  3", b"POST /twice  2", b"GET /ows  0", b"GET /old  0"):
        assert body in data
