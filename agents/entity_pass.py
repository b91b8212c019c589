"""process_<entity>: one pass over an entity's current topic for every job that reads it.

Down-conversion and the views' first stage both read `<entity>-v<current>`. As two agents,
Faust delivered each message twice (consumer -> conductor -> one stream per agent, with its
sensors, acks and batch bookkeeping) and each decoded it. Measured on the whole worker catching
up on 10,000 orders (bench/catchup.py, relay in its own process): with the down-conversion
agent removed the views ran at 2,300-2,900 events/s instead of 1,460-1,720, so the per-pass
cost was the largest single cost left. One agent now reads each batch once, decodes each value
once, runs every job on it as a pure function of (events, records), and produces all of their
output in one `produce_all` before the batch is acked.

The jobs share a failure domain (the broker and this worker's tables): a batch counts as done
only when every job's output reached Kafka, and a crash redoes it for all of them (down-
conversion is at-least-once with the event id kept; the views are idempotent). Each job still
handles its own bad input: the down-converter dead-letters what it cannot convert, the views
skip it. The Redis cache stays a separate agent (`agents/cache.py`): it depends on another
server, and Redis being down must not hold up the views and `orders-v1`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import faust
from faust.types import EventT

from agents.batching import BATCH, WITHIN, produce_all, take_ready
from app.wire.messages import Outgoing, decode
from app.wire.schemas import EventSchema, load

#: A decoded event record, or why the message could not be decoded.
Decoded = dict[str, Any] | Exception


class Job(Protocol):
    """One stream job run on every batch of an entity's current topic."""

    #: The pipeline stage it counts as in metrics and on the status page (`app.ops.metrics.STAGES`).
    stage: str

    def run(self, events: Sequence[EventT], records: Sequence[Decoded]) -> list[Outgoing]:
        """The messages to produce for the batch (table writes may be made here; no awaits)."""

    def sent(self, out: list[Outgoing]) -> None:
        """Called once the messages `run` returned are acked by the broker."""


def decode_all(schema: EventSchema, values: Sequence[bytes | None]) -> list[Decoded]:
    """Each value's record, or the error that makes it poison (pure: no I/O)."""
    out: list[Decoded] = []
    for value in values:
        try:
            if value is None:
                raise ValueError("message has no value (tombstone) on an event topic")
            out.append(decode(schema, value))
        except Exception as exc:  # anything undecodable is poison; each job decides what to do with it
            out.append(exc)
    return out


def install(app: faust.App, jobs: Mapping[tuple[str, int], Sequence[Job]]) -> None:
    """Declare one agent per (entity, current version) that has jobs."""
    for (entity, version), entity_jobs in jobs.items():
        if entity_jobs:
            _declare(app, load(entity, version), list(entity_jobs))


def _declare(app: faust.App, schema: EventSchema, jobs: list[Job]) -> None:
    topic = app.topic(schema.topic, key_serializer="raw", value_serializer="raw")
    name = f"process_{schema.entity}"

    async def process_entity(stream: faust.StreamT[Any]) -> None:
        # take_ready acks a batch only after this loop body finished with it, so the offsets
        # Faust commits never run ahead of what every job produced (at-least-once).
        async for events in take_ready(stream, BATCH, WITHIN):
            records = decode_all(schema, [e.message.value for e in events])
            outputs = [job.run(events, records) for job in jobs]
            await produce_all(app, [m for out in outputs for m in out], stage=name)
            for job, out in zip(jobs, outputs):
                job.sent(out)  # counted once produced: numbers never run ahead of Kafka

    # The metrics and status page count this agent's events once for each job's stage.
    process_entity.stages = tuple(job.stage for job in jobs)  # type: ignore[attr-defined]  # read by app/ops/metrics.py
    app.agent(topic, name=name)(process_entity)
