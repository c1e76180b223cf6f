"""The REST port's resource limits (issue 10 follow-up): request bodies held at once
(``max_body_bytes_in_flight``) and connections (``max_connections``,
``max_connections_per_address``)."""

from __future__ import annotations

import orjson
import pytest
import trio

from iii.errors import ConfigError
from iii.testing import make_config
from tests.modules.rest_api.helpers import add_route, open_rest_engine, open_worker, rest_module

KiB = 1024
MiB = 1024 * KiB


def json_body(size: int) -> bytes:
    """A JSON document of ``size`` bytes."""
    return orjson.dumps({"x": "a" * (size - 8)})


async def post(port: int, path: str, body: bytes) -> bytes:
    """One POST with a known length on its own connection; the whole answer."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request + body)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer


async def test_json_bodies_held_at_once_are_bounded_in_bytes_and_the_rest_wait() -> None:
    """Before: with 8 calls in flight the engine held 8 bodies read whole (up to
    ``concurrency_request_limit`` x ``max_body_size``); now the bodies beyond the
    budget are not read until room comes back, and none is refused."""
    size, requests = 600 * KiB, 8
    in_flight = 0
    most = 0
    release = trio.Event()

    async def hold(data):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return {"body": {"length": len(data["body"]["x"])}}

    config = {"max_body_size": MiB, "max_body_bytes_in_flight": 2 * MiB, "default_timeout": 60_000}
    async with (
        open_rest_engine(**config) as (engine, base),
        open_worker(engine, {"t::hold": hold}) as worker,
    ):
        await add_route(engine, worker, "t::hold", "/hold", "POST")
        module = engine.modules["rest_api"]
        answers: list[bytes] = []

        async def one() -> None:
            answers.append(await post(module.port, "/hold", json_body(size)))

        async with trio.open_nursery() as nursery:
            for _ in range(requests):
                nursery.start_soon(one)
            # Each request is either a call in flight (its body held) or waits for room.
            with trio.fail_after(20):
                while in_flight + module.statistics()["bodies_waiting"] < requests:
                    await trio.sleep(0.01)
            held = module.statistics()["body_bytes"]
            # The budget, and the oldest waiting body past it.
            assert in_flight * size <= 3 * MiB, f"{in_flight} bodies of {size} bytes held"
            assert size * in_flight <= held <= 3 * MiB
            assert module.statistics()["bodies_waiting"] > 0
            release.set()
        assert len(answers) == requests
        assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers), answers
        assert most < requests
        assert module.statistics()["body_bytes"] == 0


async def test_a_body_that_finds_no_room_before_its_deadline_gets_503_with_retry_after() -> None:
    async def answer(data):
        return {"body": "served"}

    config = {"max_body_size": MiB, "max_body_bytes_in_flight": MiB, "default_timeout": 1000}
    async with (
        open_rest_engine(**config) as (engine, base),
        open_worker(engine, {"t::answer": answer}) as worker,
    ):
        await add_route(engine, worker, "t::answer", "/answer", "POST")
        module = engine.modules["rest_api"]
        # Bodies of other requests fill the budget for longer than this request waits.
        holder = object()
        assert module.bodies.try_take(holder, MiB)
        refused = await post(module.port, "/answer", json_body(512 * KiB))
        head = refused.partition(b"\r\n\r\n")[0].lower()
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:200]
        assert b"\r\nretry-after: 1\r\n" in head + b"\r\n"
        assert b"SERVER_BUSY" in refused
        assert module.statistics()["bodies_refused"] == 1
        # Room again: the same request is served.
        module.bodies.give_back(MiB)
        module.bodies.done_receiving(holder)
        served = await post(module.port, "/answer", json_body(512 * KiB))
        assert served.startswith(b"HTTP/1.1 200 "), served[:200]
        assert module.statistics()["body_bytes"] == 0


async def test_a_chunked_body_takes_room_as_it_arrives() -> None:
    """Without a length, a body takes room chunk by chunk: one larger than what is left
    waits (its connection is not read) and completes once room comes back."""
    seen: list[int] = []

    async def answer(data):
        seen.append(len(data["body"]["x"]))
        return {"body": "served"}

    config = {"max_body_size": MiB, "max_body_bytes_in_flight": MiB, "default_timeout": 30_000}
    async with (
        open_rest_engine(**config) as (engine, base),
        open_worker(engine, {"t::answer": answer}) as worker,
    ):
        await add_route(engine, worker, "t::answer", "/answer", "POST")
        module = engine.modules["rest_api"]
        holder = object()  # another body still arriving: the oldest receiver
        assert module.bodies.try_take(holder, 900 * KiB)
        body = json_body(600 * KiB)
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536])
            for i in range(0, len(body), 65536)
        )
        request = (
            b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        answer_bytes = b""
        async with (
            await trio.open_tcp_stream("127.0.0.1", module.port) as stream,
            trio.open_nursery() as nursery,
        ):
            # (In the background: what the engine does not read fills the socket buffers.)
            nursery.start_soon(stream.send_all, request)
            with trio.fail_after(10):
                while module.statistics()["bodies_waiting"] == 0:
                    await trio.sleep(0.01)
            assert seen == [] and module.statistics()["body_bytes"] <= MiB
            module.bodies.give_back(900 * KiB)
            module.bodies.done_receiving(holder)
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    answer_bytes += chunk
        assert answer_bytes.startswith(b"HTTP/1.1 200 "), answer_bytes[:200]
        assert seen == [600 * KiB - 8]
        assert module.statistics()["body_bytes"] == 0


def test_max_body_bytes_in_flight_holds_at_least_one_body() -> None:
    with pytest.raises(ConfigError) as info:
        make_config([rest_module(max_body_size=2000, max_body_bytes_in_flight=1000)])
    assert str(info.value) == (
        "modules[0].config.max_body_bytes_in_flight: must be at least max_body_size (2000), "
        "got 1000"
    )
    with pytest.raises(ConfigError, match="expected an integer, got a boolean"):
        make_config([rest_module(max_body_bytes_in_flight=True)])


# -- connections ------------------------------------------------------------------------


async def open_idle(port: int, count: int) -> list[trio.SocketStream]:
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def get_unrouted(port: int) -> bytes:
    """A request the server answers itself (no route: 404)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return await read_all(stream)


async def answer_on_accept(port: int) -> bytes:
    """What the server says to a socket that sends nothing (a refused one: 503, at once;
    a client that sent its request may see a reset instead, its request unread)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        return await read_all(stream)


async def test_sockets_past_an_addresses_share_are_refused_on_accept_with_503() -> None:
    """Before: the REST port took every socket it was offered (file descriptors are
    the whole engine's); now one address holds at most its share."""
    async with open_rest_engine(max_connections_per_address=5) as (engine, _):
        module = engine.modules["rest_api"]
        idle = await open_idle(module.port, 5)
        try:
            with trio.fail_after(10):
                while module.statistics()["connections"] < 5:
                    await trio.sleep(0.01)
            refused = await answer_on_accept(module.port)  # the sixth, from the same address
            assert refused.startswith(b"HTTP/1.1 503 "), refused[:200]
            assert b"\r\nRetry-After: 1\r\n" in refused
            assert module.statistics()["connections_refused"] == 1
            assert module.statistics()["connections"] == 5
        finally:
            for stream in idle:
                await stream.aclose()
        # The share is given back as the sockets close.
        with trio.fail_after(10):
            while module.statistics()["connections"]:
                await trio.sleep(0.01)
        assert (await get_unrouted(module.port)).startswith(b"HTTP/1.1 404 ")


async def test_sockets_past_max_connections_are_refused_whatever_their_address() -> None:
    async with open_rest_engine(max_connections=3, max_connections_per_address=100) as (
        engine,
        _,
    ):
        module = engine.modules["rest_api"]
        idle = await open_idle(module.port, 3)
        try:
            with trio.fail_after(10):
                while module.statistics()["connections"] < 3:
                    await trio.sleep(0.01)
            assert (await answer_on_accept(module.port)).startswith(b"HTTP/1.1 503 ")
        finally:
            for stream in idle:
                await stream.aclose()


def test_rest_connection_limits_are_positive_counts() -> None:
    for key in ("max_connections", "max_connections_per_address"):
        with pytest.raises(ConfigError, match=f"{key}: must be at least 1, got 0"):
            make_config([rest_module(**{key: 0})])
