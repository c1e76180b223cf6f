"""Hostile connections (issue 10 rows 1 and 10): what a peer can do to the engine
through its sockets alone.

* Row 1: five close paths with a peer that floods WebSocket pings and never
  answers our Close, and an oversized message after our Close: the engine
  must end that one connection and keep serving (trio-websocket #184 answered
  those pings with a Pong after our Close, and the resulting
  ``LocalProtocolError`` crashed the whole engine).  A stream client that
  reads nothing is dropped, not held forever.
* Row 10: one peer address cannot take every slot of a port, sockets that
  never finish their handshake count, and with tokens on, unauthenticated
  sockets cannot starve an authenticated worker.
* The same attacks replayed against a real engine process
  (:class:`tests.support.EngineProcess`) with its default limits.

Every peer here is a raw ``wsproto`` client over a real loopback socket, so it
can do what no well-behaved client library does; "another address" is a
socket bound to 127.0.0.2.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import wsproto
from trio_websocket import wrap_client_stream
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from iii.engine import Engine
from iii.testing import RawWorker, connect_loopback_worker, make_config, open_test_engine
from tests.support import EngineProcess, reserve_port, wait_for_port


@attrs.define(eq=False)
class RawPeer:
    """A WebSocket client that does only what the test tells it to."""

    stream: trio.SocketStream
    ws: wsproto.WSConnection
    status: int  # 101 if upgraded
    events: list[Event] = attrs.field(factory=list)
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _partial: str = ""

    async def send(self, event: Event) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.ws.send(event))

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(TextMessage(data=orjson.dumps(message).decode()))

    async def read_until(self, predicate: Any, timeout: float = 5.0) -> Event:
        """Read (and keep) events until one matches ``predicate``."""
        with trio.fail_after(timeout):
            while True:
                for index, event in enumerate(self.events):
                    if predicate(event):
                        return self.events.pop(index)
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the engine closed the socket")
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, TextMessage):  # keep whole messages only
                        self._partial += event.data
                        if not event.message_finished:
                            continue
                        event, self._partial = TextMessage(data=self._partial), ""
                    self.events.append(event)

    async def receive_json(self, timeout: float = 5.0) -> Any:
        event = await self.read_until(lambda e: isinstance(e, TextMessage), timeout)
        assert isinstance(event, TextMessage)
        return orjson.loads(event.data)

    async def flood_pings(self) -> None:
        """Ping until the engine drops the socket; never read, never answer a Close."""
        try:
            while True:
                await self.send(Ping(payload=b"p"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def open_peer(
    port: int,
    target: str = "/",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    source: str = "127.0.0.1",
) -> RawPeer:
    """Upgrade from address ``source``; ``status`` is 101, the refusal's status,
    or 0 if the engine closed the socket without an answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    peer = RawPeer(stream, ws, status=0)
    try:
        request = Request(host="127.0.0.1", target=target, extra_headers=headers or [])
        await stream.send_all(ws.send(request))
        event = await peer.read_until(lambda e: isinstance(e, (AcceptConnection, RejectConnection)))
    except (EOFError, trio.BrokenResourceError):
        return peer
    peer.status = event.status_code if isinstance(event, RejectConnection) else 101
    return peer


def join(subscription: str) -> dict[str, Any]:
    """A stream client's join of group ``s``/``g``."""
    data = {"subscriptionId": subscription, "streamName": "s", "groupId": "g"}
    return {"type": "join", "data": data}


def item(data: Any) -> dict[str, Any]:
    """The input of ``stream::set`` for item ``s``/``g``/``i``."""
    return {"stream_name": "s", "group_id": "g", "item_id": "i", "data": data}


async def closed_by_engine(stream: trio.SocketStream, timeout: float = 5.0) -> bool:
    """True once the engine has closed ``stream`` (whatever it sent before)."""
    with trio.move_on_after(timeout):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


@asynccontextmanager
async def worker_from(port: int, source: str, token: str | None = None) -> AsyncIterator[RawWorker]:
    """A raw worker whose socket comes from address ``source``."""
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/", extra_headers=headers)
        worker = RawWorker(ws)
        registered = await worker.receive()
        assert registered["type"] == "workerregistered", registered
        worker.worker_id = registered["worker_id"]
        yield worker
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def pinging(peer: RawPeer) -> AsyncIterator[trio.Event]:
    """Flood pings from ``peer`` in the background; the event is set when the
    engine has dropped the socket."""
    dropped = trio.Event()

    async def flood() -> None:
        await peer.flood_pings()
        dropped.set()

    async with peer.stream, trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        yield dropped
        nursery.cancel_scope.cancel()


async def assert_serving(engine: Engine) -> None:
    """A fresh worker can connect and call an engine function."""
    with trio.fail_after(10):
        async with connect_loopback_worker(engine) as worker:
            result = await worker.call("engine::functions::list", {})
    assert "result" in result, result


# -- row 1: the five close paths, with a peer that keeps pinging --------------------------


STREAM = "modules::stream::StreamModule"


def stream_config(**stream_keys: Any) -> Any:
    config = {"port": 0, "host": "127.0.0.1", **stream_keys}
    return make_config([{"class": STREAM, "config": config}])


async def test_a_slow_stream_client_dropped_with_1008_while_pinging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The unauthenticated attack of issue 10: 3,000 joins, then no reads and a
    ping flood.  One event for the 3,000 subscriptions overflows the client's
    queue; the engine drops it (1008) and keeps serving."""
    monkeypatch.setattr("iii.modules.stream.server.SLOW_CLIENT_GRACE", 1.0)
    async with open_test_engine(stream_config()) as engine:
        port = engine.modules["stream"].server.listen_port
        peer = await open_peer(port)
        assert peer.status == 101
        with trio.fail_after(30):
            for n in range(3000):
                await peer.send_json(join(f"sub{n}"))
            for _ in range(3000):  # the syncs
                await peer.receive_json()
        async with pinging(peer) as dropped:
            await engine.invoke("stream::set", item(1))
            with trio.fail_after(30):
                await dropped.wait()
        await assert_serving(engine)
        # The stream port still serves too.
        other = await open_peer(port)
        async with other.stream:
            await other.send_json(join("a"))
            message = await other.receive_json(timeout=10)
            assert message["event"]["type"] == "sync"


async def test_a_stream_client_that_reads_nothing_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its socket fills up, so the writer blocks with its queue far from full: the
    client is still dropped ``SLOW_CLIENT_GRACE`` after (it was held forever)."""
    monkeypatch.setattr("iii.modules.stream.server.SLOW_CLIENT_GRACE", 1.0)
    async with open_test_engine(stream_config()) as engine:
        await engine.invoke("stream::set", item("x" * 262144))
        server = engine.modules["stream"].server
        peer = await open_peer(server.listen_port)
        async with peer.stream:
            for n in range(40):  # 10 MiB of sync answers, never read
                await peer.send_json(join(f"s{n}"))
            with trio.fail_after(15):
                while server.connections:
                    await trio.sleep(0.05)
        await assert_serving(engine)


async def test_a_worker_replaced_by_reattach_while_pinging() -> None:
    async with open_test_engine(make_config()) as engine:
        old = await open_peer(engine.listen_port)
        hello = await old.receive_json()
        assert hello["type"] == "workerregistered"
        async with pinging(old) as dropped:
            async with connect_loopback_worker(engine) as new:
                await new.send(
                    {
                        "type": "reattach",
                        "previous_worker_id": hello["worker_id"],
                        "reattach_token": hello["reattach_token"],
                    }
                )
                with trio.fail_after(15):
                    await dropped.wait()
                assert "result" in await new.call("engine::functions::list", {})
        await assert_serving(engine)


async def test_a_worker_dropped_by_the_heartbeat_while_pinging() -> None:
    config = make_config(heartbeat_interval_ms=200, heartbeat_timeout_ms=300)
    async with open_test_engine(config) as engine:
        peer = await open_peer(engine.listen_port)
        assert (await peer.receive_json())["type"] == "workerregistered"
        # It pings, but never reads: the engine's pings go unanswered.
        async with pinging(peer) as dropped:
            with trio.fail_after(15):
                await dropped.wait()
        await assert_serving(engine)


async def test_a_second_claim_of_a_channel_side_while_pinging() -> None:
    async with open_test_engine(make_config()) as engine:
        channel = engine.channels.create()
        channel.claim_writer()
        target = f"/ws/channels/{channel.channel_id}?key={channel.access_key}&dir=write"
        peer = await open_peer(engine.listen_port, target)
        assert peer.status == 101
        async with pinging(peer) as dropped:
            with trio.fail_after(15):
                await dropped.wait()
        await assert_serving(engine)


async def test_a_channel_reader_closed_when_its_writer_finishes_while_pinging() -> None:
    async with open_test_engine(make_config()) as engine:
        channel = engine.channels.create()
        target = f"/ws/channels/{channel.channel_id}?key={channel.access_key}&dir=read"
        peer = await open_peer(engine.listen_port, target)
        assert peer.status == 101
        async with pinging(peer) as dropped:
            writer = channel.claim_writer()
            await writer.send("last frame")
            writer.close()
            with trio.fail_after(15):
                await dropped.wait()
        await assert_serving(engine)


# -- the same bug on two more paths: what a peer sends after our Close ------------------


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a zero key (so the payload stays as is)."""
    assert len(payload) < 65536
    if len(payload) < 126:
        length = bytes([0x80 | len(payload)])
    else:
        length = b"\xfe" + len(payload).to_bytes(2, "big")
    return bytes([0x80 | opcode]) + length + b"\0\0\0\0" + payload


async def _closed_channel_claim(engine: Engine) -> RawPeer:
    """A channel socket the engine has sent its Close to (the side was claimed)."""
    channel = engine.channels.create()
    channel.claim_writer()
    target = f"/ws/channels/{channel.channel_id}?key={channel.access_key}&dir=write"
    peer = await open_peer(engine.listen_port, target)
    assert peer.status == 101
    await peer.read_until(lambda e: isinstance(e, CloseConnection))
    return peer


async def test_an_oversized_message_after_our_close() -> None:
    """trio-websocket answers it with a 1009 Close, which wsproto refuses once ours is out."""
    async with open_test_engine(make_config(max_message_size=1024)) as engine:
        peer = await _closed_channel_claim(engine)
        async with peer.stream:
            await peer.stream.send_all(masked_frame(0x1, b"x" * 2000))  # its wsproto would refuse
            with trio.fail_after(10):
                assert await peer.stream.receive_some(65536) == b""
        await assert_serving(engine)


async def test_a_malformed_frame_after_our_close() -> None:
    """wsproto turns it into a Close event (no reply is sent): this one never crashed."""
    async with open_test_engine(make_config()) as engine:
        peer = await _closed_channel_claim(engine)
        async with peer.stream:
            await peer.stream.send_all(masked_frame(0xF, b""))  # a reserved opcode
            with trio.fail_after(10):
                assert await peer.stream.receive_some(65536) == b""
        await assert_serving(engine)


# -- row 10: connection exhaustion ---------------------------------------------------------

TOKEN = "hostile-test-token-0123456789"
BEARER = f"Bearer {TOKEN}".encode()
AUTH = {"tokens": [{"name": "admin", "env": "III_HOSTILE_TOKEN"}]}


async def test_one_address_cannot_take_every_slot_of_the_worker_port() -> None:
    config = make_config(max_connections=8, max_connections_per_address=4)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        # Two sockets that never send their request (slowloris) count from accept ...
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        # ... so only two of these idle workers get in; the rest are refused at once.
        idle = [await open_peer(port) for _ in range(8)]
        assert [peer.status for peer in idle].count(101) == 2
        assert all(peer.status in (0, 503) for peer in idle if peer.status != 101)
        # A worker from another address is not affected.
        with trio.fail_after(10):
            async with worker_from(port, "127.0.0.2") as worker:
                assert "result" in await worker.call("engine::functions::list", {})
        for stream in silent + [peer.stream for peer in idle]:
            await stream.aclose()
        # Their slots come back.
        with trio.fail_after(10):
            while engine.open_sockets:
                await trio.sleep(0.02)
        async with worker_from(port, "127.0.0.1") as worker:
            assert "result" in await worker.call("engine::functions::list", {})


async def test_with_tokens_unauthenticated_sockets_cannot_starve_an_authenticated_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("III_HOSTILE_TOKEN", TOKEN)
    config = make_config(auth=AUTH, max_connections=6, max_connections_per_address=2)
    async with open_test_engine(config) as engine:
        port = engine.listen_port
        # A socket refused 401 is closed by the engine at once, though the peer keeps it.
        for _ in range(10):
            refused = await open_peer(port)
            assert refused.status == 401
            assert await closed_by_engine(refused.stream), "a 401 socket was kept open"
            await refused.stream.aclose()
        # Sockets that never finish their handshake take their address's share only.
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        same_address = await open_peer(port, headers=[(b"Authorization", BEARER)])
        await same_address.stream.aclose()
        assert same_address.status in (0, 503)  # the documented cost for a shared address
        # Authenticated workers from another address all get in: once
        # authenticated, they no longer count against their address.
        async with AsyncExitStack() as stack:
            workers = [
                await stack.enter_async_context(worker_from(port, "127.0.0.2", TOKEN))
                for _ in range(5)
            ]
            for worker in workers:
                assert "result" in await worker.call("engine::functions::list", {})
            assert engine.sockets.upgraded == 5
        for stream in silent:
            await stream.aclose()


async def test_one_address_cannot_take_every_slot_of_the_stream_port() -> None:
    config = stream_config(max_connections=8, max_connections_per_address=3)
    async with open_test_engine(config) as engine:
        port = engine.modules["stream"].server.listen_port
        clients = [await open_peer(port) for _ in range(6)]
        assert [client.status for client in clients].count(101) == 3
        other = await open_peer(port, source="127.0.0.2")
        async with other.stream:
            assert other.status == 101
            await other.send_json(join("a"))
            assert (await other.receive_json(timeout=10))["event"]["type"] == "sync"
        for client in clients:
            await client.stream.aclose()


# -- the same attacks against a real engine process ----------------------------------------


@asynccontextmanager
async def engine_process(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[EngineProcess]:
    engine = EngineProcess.write(tmp_path, config)
    engine.start()
    try:
        await engine.started()
        yield engine
        assert engine.process is not None
        assert engine.process.poll() is None, f"the engine exited:\n{engine.log_text()[-3000:]}"
    finally:
        engine.kill()


async def assert_process_serving(
    engine: EngineProcess, source: str = "127.0.0.1", token: str | None = None
) -> None:
    assert engine.process is not None
    assert engine.process.poll() is None, f"the engine exited:\n{engine.log_text()[-3000:]}"
    with trio.fail_after(10):
        async with worker_from(engine.port, source, token) as worker:
            assert "result" in await worker.call("engine::functions::list", {})


async def test_replay_the_stream_port_attack_on_a_real_engine(tmp_path: Path) -> None:
    """3,000 joins, no reads, a ping flood: the engine drops the client (1008) and
    lives on.  (Its 3,000 sync answers alone overflow the client's queue; if
    they do not, one event for the 3,000 subscriptions does.)"""
    stream_port = reserve_port()
    modules = [{"class": STREAM, "config": {"port": stream_port, "host": "127.0.0.1"}}]
    async with engine_process(tmp_path, {"modules": modules}) as engine:
        await wait_for_port(stream_port)
        peer = await open_peer(stream_port)
        assert peer.status == 101
        async with pinging(peer) as dropped:
            try:
                for n in range(3000):
                    await peer.send_json(join(f"sub{n}"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # dropped already
            with trio.move_on_after(5):
                await dropped.wait()
            if not dropped.is_set():
                async with worker_from(engine.port, "127.0.0.1") as writer:
                    assert "result" in await writer.call("stream::set", item(1))
            with trio.fail_after(30):  # SLOW_CLIENT_GRACE (10 s), then the close
                await dropped.wait()
        await assert_process_serving(engine)
        other = await open_peer(stream_port)
        async with other.stream:
            await other.send_json(join("a"))
            assert (await other.receive_json(timeout=10))["event"]["type"] == "sync"


async def test_replay_1100_idle_sockets_on_a_real_engine(tmp_path: Path) -> None:
    """Default limits: one address takes max_connections_per_address (256) sockets,
    not all 1024 of max_connections; a worker from another address gets in."""
    async with engine_process(tmp_path, {"modules": []}) as engine:
        idle: list[RawPeer] = []
        try:
            with trio.fail_after(60):
                for _ in range(1100):
                    idle.append(await open_peer(engine.port))
            await assert_process_serving(engine, "127.0.0.2")
            assert [peer.status for peer in idle].count(101) == 256
        finally:
            for peer in idle:
                await peer.stream.aclose()


async def test_replay_an_unauthenticated_flood_on_a_real_engine_with_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sockets that never finish their handshake, and sockets refused 401 that the
    peer keeps open: an authenticated worker from another address still gets in."""
    monkeypatch.setenv("III_HOSTILE_TOKEN", TOKEN)  # inherited by the engine process
    async with engine_process(tmp_path, {"modules": [], "auth": AUTH}) as engine:
        held: list[trio.SocketStream] = []
        try:
            with trio.fail_after(60):
                for _ in range(50):
                    refused = await open_peer(engine.port)
                    held.append(refused.stream)
                    assert refused.status == 401
                    assert await closed_by_engine(refused.stream), "a 401 socket was kept open"
                for _ in range(600):
                    held.append(await trio.open_tcp_stream("127.0.0.1", engine.port))
            await assert_process_serving(engine, "127.0.0.2", TOKEN)
        finally:
            for stream in held:
                await stream.aclose()
