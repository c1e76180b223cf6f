"""The AMQP client's frame loop (:mod:`iii.adapters.queue.amqp`) over a stream pair.

These drive :class:`AmqpConnection` over ``trio.testing.lockstep_stream_pair``
to reach states a healthy RabbitMQ does not produce on demand: a broker that
stops reading (a memory or disk alarm blocks publishers that way), then a
connection that drops.  The behaviour with a real broker is covered by
``tests/modules/test_queue.py``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
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
