"""Issue 10 follow-up, "limits count bytes, not messages", replayed against a real engine.

``python -m iii serve`` runs as a child process (:class:`~tests.support.EngineProcess`);
the attacks come over real sockets, and the engine's own byte accounting is
read from its Prometheus endpoint (``iii_inbound_bytes*``) or its module
statistics.

* worker-port read-ahead: workers that send large messages faster than the
  engine decodes them make it hold at most ``max_inbound_bytes`` (plus one
  message and each socket's 64 KiB read-ahead), not 64 messages per socket;
  none is dropped and nothing is lost;
* the stream port's share: stream clients (no credentials) that stall in the
  middle of large messages hold at most the stream module's
  ``max_inbound_bytes``, workers keep their room, and a client that waits for
  room past ``inbound_wait_timeout_ms`` is closed with 1013;
* the REST port: idle sockets from one address hold at most its share of the
  engine's file descriptors (``max_connections_per_address``), and JSON
  bodies of requests in flight at most ``max_body_bytes_in_flight``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import wsproto
from trio_websocket import wrap_client_stream
from wsproto.events import AcceptConnection, CloseConnection, Request

from iii.testing import RawWorker
from tests.support import EngineProcess, reserve_port, wait_for_port

MiB = 1024 * 1024
READ_AHEAD = 64 * 1024  # iii.listener.READ_AHEAD_BYTES


@pytest.fixture(autouse=True)
def _info_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("III_LOG_LEVEL", "info")


def observability(prometheus_port: int) -> dict[str, Any]:
    return {
        "class": "modules::observability::OtelModule",
        "config": {
            "enabled": True,
            "exporter": "memory",
            "prometheus_enabled": True,
            "prometheus_port": prometheus_port,
        },
    }


@asynccontextmanager
async def running_engine(directory: Path, config: dict[str, Any]) -> AsyncIterator[EngineProcess]:
    engine = EngineProcess.write(directory, config)
    engine.start()
    try:
        await engine.started()
        yield engine
    finally:
        engine.kill()


@asynccontextmanager
async def raw_worker(port: int) -> AsyncIterator[RawWorker]:
    """A raw WebSocket worker on a socket this helper owns and always closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, "127.0.0.1", "/", message_queue_size=64, max_message_size=64 * MiB
        )
        worker = RawWorker(ws)
        registered = await worker.receive(timeout=10)
        assert registered["type"] == "workerregistered"
        try:
            yield worker
        finally:
            with trio.move_on_after(2):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def metrics(port: int) -> dict[str, float]:
    """The engine's Prometheus samples, by name (unlabelled ones)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        response = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                response += chunk
    samples = {}
    for line in response.partition(b"\r\n\r\n")[2].decode().splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def slow_to_decode(size: int) -> bytes:
    """A ``ping`` of ``size`` bytes whose decoding takes the engine a while (a list of
    small integers): sent at once by a few workers, they arrive faster than it reads."""
    head, tail = b'{"type":"ping","x":[', b"0]}"
    return head + b"0," * ((size - len(head) - len(tail)) // 2) + tail


async def still_serves(engine: EngineProcess) -> None:
    async with raw_worker(engine.port) as worker:
        await worker.send({"type": "ping"})
        assert (await worker.receive_type("pong", timeout=10)) == {"type": "pong"}


# -- the worker port ----------------------------------------------------------------------


async def test_workers_sending_faster_than_the_engine_reads_hold_a_bounded_number_of_bytes(
    tmp_path: Path,
) -> None:
    """Before: each socket's reader could queue 64 whole messages ahead of the engine's
    (6 sockets x 64 x 4 MiB here); now all of them together hold the budget."""
    prometheus_port = reserve_port()
    sockets, messages, size = 6, 12, 4 * MiB
    config = {
        "max_message_size": size,
        "max_inbound_bytes": 8 * MiB,
        "inbound_wait_timeout_ms": 600_000,  # backpressure only: nobody is closed
        "modules": [observability(prometheus_port)],
    }
    frame = slow_to_decode(size).decode()
    pongs = [0] * sockets
    async with running_engine(tmp_path, config) as engine:
        await still_serves(engine)

        async def flood(index: int) -> None:
            async with raw_worker(engine.port) as worker:
                for _ in range(messages):
                    await worker.ws.send_message(frame)
                for _ in range(messages):
                    await worker.receive_type("pong", timeout=120)
                    pongs[index] += 1

        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for index in range(sockets):
                    nursery.start_soon(flood, index)
        samples = await metrics(prometheus_port)
        await still_serves(engine)
        assert engine.process is not None and engine.process.poll() is None
    # Every message was read and answered: held back, never dropped.
    assert pongs == [messages] * sockets
    assert samples["iii_inbound_timeouts_total"] == 0
    peak = samples["iii_inbound_bytes_peak"]
    bound = 8 * MiB + size  # the budget, and the oldest message past it
    assert size <= peak <= bound, f"peak {peak / MiB:.1f} MiB"
    assert samples["iii_inbound_bytes"] == 0


# -- the stream port ---------------------------------------------------------------------


@asynccontextmanager
async def stalled_stream_client(port: int, sent: int, announced: int) -> AsyncIterator[Any]:
    """A stream client that announces a message of ``announced`` bytes, sends
    ``sent`` of them, and stalls; yields a function that reads its Close code."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(client.send(Request(host="127.0.0.1", target="/")))
        events: list[Any] = []
        with trio.fail_after(10):
            while not any(isinstance(event, AcceptConnection) for event in events):
                client.receive_data(await stream.receive_some(65536))
                events.extend(client.events())
        header = bytes([0x82, 0x80 | 127]) + announced.to_bytes(8, "big") + b"\0\0\0\0"
        with trio.move_on_after(10):  # (what the engine does not read stays in the kernel)
            try:
                await stream.send_all(header + bytes(sent))
            except trio.BrokenResourceError:
                pass  # closed while our bytes waited: its Close may still be readable

        async def close_code(timeout: float) -> int | str | None:
            """1013 &c., "reset" if the socket ended without a readable Close,
            None if it is still open after ``timeout``."""
            with trio.move_on_after(timeout):
                try:
                    while data := await stream.receive_some(65536):
                        client.receive_data(data)
                        for event in client.events():
                            if isinstance(event, CloseConnection):
                                return int(event.code)
                except trio.BrokenResourceError:
                    pass
                return "reset"
            return None

        yield close_code


async def test_stalled_stream_clients_hold_their_share_only_and_workers_keep_their_room(
    tmp_path: Path,
) -> None:
    prometheus_port = reserve_port()
    stream_port = reserve_port()
    clients = 12
    config = {
        "max_message_size": 4 * MiB,
        "max_inbound_bytes": 8 * MiB,
        "inbound_wait_timeout_ms": 3000,
        "modules": [
            observability(prometheus_port),
            {
                "class": "modules::stream::StreamModule",
                "config": {"port": stream_port, "host": "127.0.0.1", "max_inbound_bytes": MiB},
            },
        ],
    }
    async with running_engine(tmp_path, config) as engine, trio.open_nursery() as nursery:
        codes: list[int | str | None] = []

        async def client() -> None:
            # 900 KiB of a 1 MiB message: past its 4 KiB read-ahead, from the share.
            async with stalled_stream_client(stream_port, 900 * 1024, MiB - 1) as close_code:
                codes.append(await close_code(10))  # (the wait timeout is 3 s)

        for _ in range(clients):
            nursery.start_soon(client)
        with trio.fail_after(60):
            while len(codes) < clients:
                held = (await metrics(prometheus_port))["iii_inbound_bytes"]
                # The share (1 MiB) and the oldest client's message past it.
                assert held <= 2 * MiB, f"{held / MiB:.1f} MiB held for stalled clients"
                # Workers still have their room: two 4 MiB messages go through.
                async with raw_worker(engine.port) as worker:
                    for _ in range(2):
                        await worker.ws.send_message(slow_to_decode(4 * MiB).decode())
                    for _ in range(2):
                        await worker.receive_type("pong", timeout=20)
                await trio.sleep(0.2)
        samples = await metrics(prometheus_port)
        await still_serves(engine)
    # The clients that found no room were closed with 1013 once the timeout passed (a
    # stalled client's socket is then reset: the rest of its message is never read);
    # those that got room wait for the rest of their message, still open.
    closed = [code for code in codes if code is not None]
    assert closed and set(closed) <= {1013, "reset"}, codes
    assert samples["iii_inbound_timeouts_total"] == len(closed), codes
    assert engine.log_text().count("closed (1013)") >= 1
    assert samples["iii_inbound_bytes"] <= 2 * MiB


# -- the REST port ------------------------------------------------------------------------


def rest_module(port: int, **config: Any) -> dict[str, Any]:
    return {
        "class": "modules::api::RestApiModule",
        "config": {"port": port, "host": "127.0.0.1", **config},
    }


def open_descriptors(engine: EngineProcess) -> int:
    assert engine.process is not None
    return len(os.listdir(f"/proc/{engine.process.pid}/fd"))


async def rest_answer(port: int, request: bytes) -> bytes:
    """Send ``request`` (in the background: the engine may not read it at once) and
    read the whole answer."""
    answer = b""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, request)
            with trio.fail_after(60):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
    return answer


def json_post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def test_idle_sockets_on_the_rest_port_hold_one_addresses_share_of_descriptors(
    tmp_path: Path,
) -> None:
    """Before: each of the attacker's sockets held a descriptor of the engine (600 here,
    held until the 10 s head timeout, and opened again).  Now one address holds at most
    ``max_connections_per_address`` (256 by default); the rest get 503 at once."""
    rest_port = reserve_port()
    attack = 600
    async with running_engine(tmp_path, {"modules": [rest_module(rest_port)]}) as engine:
        await wait_for_port(rest_port)
        before = open_descriptors(engine)
        sockets = []
        try:
            for _ in range(attack):
                sockets.append(await trio.open_tcp_stream("127.0.0.1", rest_port))
            # The sockets past the share are answered and closed by the engine.
            refused = 0
            with trio.fail_after(20):
                for stream in sockets[256:]:
                    answer = b""
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                    refused += answer.startswith(b"HTTP/1.1 503 ")
            held = open_descriptors(engine) - before
        finally:
            for stream in sockets:
                await stream.aclose()
        assert refused == attack - 256
        assert held <= 256 + 8, f"{held} descriptors held for {attack} idle sockets"
        # As soon as the attacker leaves, the address's share is back.
        with trio.fail_after(20):
            while True:
                answer = await rest_answer(
                    rest_port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                if answer.startswith(b"HTTP/1.1 404 "):  # answered (no such route)
                    break
                await trio.sleep(0.1)
        # Logged, at most once every 10 s (the address is the kernel's, not peer text).
        assert engine.log_text().count("REST port: refused a socket from 127.0.0.1") == 1


async def test_json_bodies_in_flight_on_the_rest_port_are_bounded_in_bytes(
    tmp_path: Path,
) -> None:
    """Before: 10 requests of 900 KiB whose function takes its time held 9 MiB of
    bodies (up to ``concurrency_request_limit`` x ``max_body_size``); now at most the
    budget and one body, and every request is served once room comes back.  (Bodies
    under 1 MiB: a raw worker gets the 0.4.1 SDK's 1 MiB frames.)"""
    rest_port, prometheus_port = reserve_port(), reserve_port()
    requests, size = 10, 900 * 1024
    config = {
        "modules": [
            observability(prometheus_port),
            rest_module(rest_port, max_body_size=MiB, max_body_bytes_in_flight=2 * MiB),
        ]
    }
    body = orjson.dumps({"x": "a" * (size - 8)})
    async with running_engine(tmp_path, config) as engine, raw_worker(engine.port) as worker:
        await worker.send({"type": "registerfunction", "id": "hostile::slow"})
        await worker.send(
            {
                "type": "registertrigger",
                "id": "slow-route",
                "trigger_type": "http",
                "function_id": "hostile::slow",
                "config": {"api_path": "/slow", "http_method": "POST"},
            }
        )
        await wait_for_port(rest_port)
        with trio.fail_after(20):  # until the route is there (GET: 405, not 404)
            while not (
                await rest_answer(
                    rest_port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
            ).startswith(b"HTTP/1.1 405 "):
                await trio.sleep(0.05)
        answers: list[bytes] = []
        calls: list[dict[str, Any]] = []

        async def client() -> None:
            answers.append(await rest_answer(rest_port, json_post("/slow", body)))

        async with trio.open_nursery() as nursery:
            for _ in range(requests):
                nursery.start_soon(client)
            # The calls that arrive hold their bodies; the worker answers none yet.
            with trio.fail_after(30):
                while True:
                    samples = await metrics(prometheus_port)
                    waiting = samples["iii_module_rest_api_bodies_waiting"]
                    if waiting and len(calls) + waiting >= requests:
                        break
                    with trio.move_on_after(0.2):
                        calls.append(await worker.receive_type("invokefunction", timeout=60))
            held = samples["iii_module_rest_api_body_bytes"]
            assert held <= 2 * MiB + MiB, f"{held / MiB:.1f} MiB of bodies held"
            assert len(calls) * size <= 3 * MiB + requests * 64 * 1024
            # Now the worker answers every call, as they come.
            with trio.fail_after(60):
                while len(answers) < requests:
                    for call in calls:
                        await worker.send(
                            {
                                "type": "invocationresult",
                                "invocation_id": call["invocation_id"],
                                "function_id": call["function_id"],
                                "result": {"status_code": 200, "body": {"ok": True}},
                            }
                        )
                    calls.clear()
                    with trio.move_on_after(0.2):
                        calls.append(await worker.receive_type("invokefunction", timeout=60))
        samples = await metrics(prometheus_port)
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers), answers
    assert samples["iii_module_rest_api_body_bytes_peak"] <= 3 * MiB
    assert samples["iii_module_rest_api_body_bytes"] == 0
    assert samples["iii_module_rest_api_bodies_refused"] == 0
