"""Dead letters: a message an agent cannot use goes, untouched, to `<source topic>.dlq`.

The headers say why it failed and where it came from; `python -m app dlq list|redrive` read
them. Agents produce their output (dead letters included) before their input is acked, so a
crash sends a letter twice at worst and never loses one.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import faust

from app.retries import retries_of
from app.wire.schemas import dlq_topic

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Incoming:
    """What an agent needs of one consumed message."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    headers: Headers


@dataclass(frozen=True)
class Outgoing:
    """One message to produce."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None
    headers: Headers
    timestamp: float | None = None  # seconds; None: now


def dead_letter(source_topic: str, msg: Incoming, exc: BaseException) -> Outgoing:
    """The original message, untouched, with why it failed and where it came from in headers."""
    reason: Headers = [
        ("dlq_error_class", type(exc).__name__.encode()),
        ("dlq_error_message", str(exc)[:1000].encode(errors="replace")),
        ("dlq_source_topic", source_topic.encode()),
        ("dlq_source_partition", str(msg.partition).encode()),
        ("dlq_source_offset", str(msg.offset).encode()),
    ]
    return Outgoing(dlq_topic(source_topic), msg.key, msg.value, None, reason + list(msg.headers))


def incoming(message: faust.types.Message) -> Incoming:
    """The parts of a consumed Faust message a dead letter keeps."""
    return Incoming(message.key, message.value, message.partition, message.offset, list(message.headers or ()))


async def produce_all(app: faust.App, messages: list[Outgoing], *, stage: str = "produce") -> None:
    """Send `messages` in order and wait for every ack, retrying until the broker takes them."""
    async def attempt() -> None:
        # Sent one after the other (each send only queues), then every ack awaited together.
        futures = [await app.producer.send(m.topic, m.key, m.value, m.partition, m.timestamp, m.headers)
                   for m in messages]
        await asyncio.gather(*futures)

    # The input is not acked until this is produced: never lose it.
    await retries_of(app).until_done(stage, attempt, first_backoff=0.1, max_backoff=5.0)
