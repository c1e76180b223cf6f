"""The RabbitMQ queue backend on a real broker, beyond the shared queue contract
(``tests/adapters/test_queue_contract.py``): recovery from channel-level errors."""

from __future__ import annotations

import uuid

import pytest
import trio
from pamqp.commands import Exchange, Queue

from iii.adapters.queue import Job
from iii.adapters.queue.amqp import open_amqp_connection
from iii.adapters.queue.rabbitmq import Config, names, open_adapter
from iii.errors import AdapterUnavailableError
from tests.support import require_rabbitmq

pytestmark = pytest.mark.services


async def test_a_broker_refusal_does_not_poison_later_calls():
    # A delay queue declared elsewhere with other arguments makes the broker
    # close the channel the adapter declares on (PRECONDITION_FAILED).  That
    # retry fails; the next calls on the same connection must work again.
    url = require_rabbitmq()
    queue = f"poison{uuid.uuid4().hex[:10]}"
    delay_queue = f"iii.{queue}.delay.1000"
    async with open_amqp_connection(url) as connection:
        channel = await connection.channel()
        await channel.rpc(Queue.Declare(queue=delay_queue, durable=True))
    try:
        with trio.fail_after(30):
            async with open_adapter(Config(amqp_url=url), None) as adapter:
                await adapter.enqueue(Job(id="j1", queue=queue, data={"n": 1}))
                async with adapter.open_consumer(queue, "c", 1) as consumer:
                    delivery = await consumer.receive(10)
                    assert delivery is not None
                    with pytest.raises(AdapterUnavailableError):
                        await consumer.retry(delivery, delivery.job, 1.0)
                stats = await adapter.stats(queue)
                assert stats.queue == queue
                await adapter.enqueue(Job(id="j2", queue=queue, data={"n": 2}))
    finally:
        async with open_amqp_connection(url) as connection:
            channel = await connection.channel()
            for name in (*names(queue)[1:], delay_queue):
                await channel.rpc(Queue.Delete(queue=name))
            await channel.rpc(Exchange.Delete(exchange=names(queue)[0]))
