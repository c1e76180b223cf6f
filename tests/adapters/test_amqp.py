"""The AMQP client's frame loop (:mod:`iii.adapters.queue.amqp`) over a stream pair.

These drive :class:`AmqpConnection` over trio's in-memory stream pairs to
reach states a healthy RabbitMQ does not produce on demand: a broker that
stops reading (a memory or disk alarm blocks publishers that way), a
connection that drops, a reply that comes after its caller gave up.  The
behaviour with a real broker is covered by ``tests/modules/test_queue.py``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from pamqp import frame
from pamqp.commands import Basic, Queue

from iii.adapters.queue.amqp import AmqpChannel, AmqpConnection
from iii.errors import AdapterUnavailableError


async def _fill_send_queue(channel: AmqpChannel) -> None:
    """Publish (unconfirmed) until a publish would wait for room in the send queue."""
    while True:
        with trio.move_on_after(1) as scope:
            await channel.publish("", "q", b"x", Basic.Properties())
        if scope.cancelled_caught:
            return


async def test_a_call_waiting_for_room_in_the_send_queue_is_bounded(autojump_clock):
    client, _broker = trio.testing.lockstep_stream_pair()  # the broker never reads
    connection = AmqpConnection(stream=client, heartbeat=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(connection._serve)
        channel = AmqpChannel(connection, 1)
        connection.channels[1] = channel
        await _fill_send_queue(channel)
        with trio.fail_after(60):
            with pytest.raises(AdapterUnavailableError):
                await channel.rpc(Queue.Declare(queue="q"), timeout=5)
        nursery.cancel_scope.cancel()


async def test_senders_waiting_on_a_lost_connection_are_released(autojump_clock):
    client, broker = trio.testing.lockstep_stream_pair()
    connection = AmqpConnection(stream=client, heartbeat=0)
    outcome: list[str] = []

    async def publish_when_full(channel: AmqpChannel) -> None:
        try:
            await channel.publish("", "q", b"x", Basic.Properties())
        except AdapterUnavailableError:
            outcome.append("failed")
        else:
            outcome.append("sent")

    async with trio.open_nursery() as nursery:
        await nursery.start(connection._serve)
        channel = AmqpChannel(connection, 1)
        connection.channels[1] = channel
        await _fill_send_queue(channel)
        nursery.start_soon(publish_when_full, channel)
        await trio.testing.wait_all_tasks_blocked()
        await broker.aclose()  # the connection drops
        with trio.fail_after(60):
            await connection.closed.wait()
            while not outcome:
                await trio.sleep(0.1)
    assert outcome == ["failed"]


async def test_a_reply_that_comes_after_its_call_gave_up_is_not_taken_by_the_next_call(
    autojump_clock,
):
    client, broker = trio.testing.memory_stream_pair()
    connection = AmqpConnection(stream=client, heartbeat=0)

    async def next_request() -> None:
        data = b""
        while len(data) < 7 or len(data) < 8 + int.from_bytes(data[3:7], "big"):
            data += await broker.receive_some()

    def declare_ok(queue: str) -> bytes:
        return frame.marshal(Queue.DeclareOk(queue=queue, message_count=0, consumer_count=0), 1)

    async def answer(queue: str) -> None:
        await next_request()
        await broker.send_all(declare_ok(queue))

    async with trio.open_nursery() as nursery:
        await nursery.start(connection._serve)
        channel = AmqpChannel(connection, 1)
        connection.channels[1] = channel
        with pytest.raises(AdapterUnavailableError):  # the broker is slow: the caller gives up
            await channel.rpc(Queue.Declare(queue="first"), timeout=1)
        await answer("first")  # ... and then answers it
        nursery.start_soon(answer, "second")
        with trio.fail_after(10):
            reply = await channel.rpc(Queue.Declare(queue="second"), timeout=5)
        assert reply.queue == "second"
        nursery.cancel_scope.cancel()
