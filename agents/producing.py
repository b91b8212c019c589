"""produce_all: an agent's output, sent in order and acked before its input is."""
from __future__ import annotations

import asyncio

import faust

from app.retries import retries_of
from app.wire.messages import Outgoing


async def produce_all(app: faust.App, messages: list[Outgoing], *, stage: str = "produce") -> None:
    """Send `messages` in order and wait for every ack, retrying until the broker takes them."""
    async def attempt() -> None:
        # Sent one after the other (each send only queues), then every ack awaited together.
        futures = [await app.producer.send(m.topic, m.key, m.value, m.partition, m.timestamp, m.headers)
                   for m in messages]
        await asyncio.gather(*futures)

    # The input is not acked until this is produced: never lose it.
    await retries_of(app).until_done(stage, attempt, first_backoff=0.1, max_backoff=5.0)
