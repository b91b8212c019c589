"""downconvert_<entity>: serves older schema versions by converting the current topic's events.

For each entity whose older versions are in `downconvert` mode (see `Order.__legacy__` and
`LEGACY_MODES`), one agent reads `<entity>-v<current>` and writes `<entity>-v<old>` with the
same key, partition and event id. What cannot be decoded or converted goes to
`<entity>-v<current>.dlq` with the reason in headers; the agent keeps going.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import faust

from agents.batching import take_ready
from app.deadletter import Incoming, Outgoing, dead_letter, dlq_topic, incoming, produce_all
from app.events import downconvert
from app.orm import current_version, legacy_modes
from app.schemas import EventSchema, load
from app.settings import Settings

#: Called after each produced batch with (source topic, events converted, events dead-lettered).
Counted = Callable[[str, int, int], None]


def convert_batch(source: EventSchema, targets: Sequence[int], batch: Sequence[Incoming]) -> list[Outgoing]:
    """The messages to produce for `batch`, in order (pure: no I/O).

    Each target version keeps the source partition: the topics have equal partition counts,
    so per-key order carries over and dual-publish (key-hashed) lands in the same partition.
    """
    out: list[Outgoing] = []
    for msg in batch:
        try:
            if msg.value is None:
                raise ValueError("message has no value (tombstone) on an event topic")
            converted = [(v, downconvert(msg.value, source, v)) for v in targets]
        except Exception as exc:  # anything undecodable or unconvertible is a dead letter
            out.append(dead_letter(source.topic, msg, exc))
            continue
        for version, (value, headers) in converted:
            out.append(Outgoing(load(source.entity, version).topic, msg.key, value, msg.partition, headers))
    return out


def downconvert_targets(settings: Settings) -> dict[str, list[int]]:
    """entity -> the older versions this worker serves by down-conversion."""
    out = {}
    for entity, modes in legacy_modes(settings.legacy_overrides()).items():
        versions = sorted((v for v, mode in modes.items() if mode == "downconvert"), reverse=True)
        if versions:
            out[entity] = versions
    return out


def install(app: faust.App, settings: Settings, counted: Counted | None = None) -> None:
    """Declare one down-conversion agent per entity that has versions in `downconvert` mode."""
    for entity, targets in downconvert_targets(settings).items():
        _declare(app, load(entity, current_version(entity)), targets, counted)


def _declare(app: faust.App, source: EventSchema, targets: list[int], counted: Counted | None) -> None:
    topic = app.topic(source.topic, key_serializer="raw", value_serializer="raw")
    dlq = dlq_topic(source.topic)

    async def downconvert_entity(stream: faust.StreamT[Any]) -> None:
        # take_ready acks a batch only after this loop body finished with it, so the
        # offsets Faust commits never run ahead of what was produced (at-least-once).
        async for events in take_ready(stream, 1000, (0.005, 0.2)):
            batch = [incoming(e.message) for e in events]
            out = convert_batch(source, targets, batch)
            await produce_all(app, out, stage=f"downconvert_{source.entity}")
            if counted is not None:
                # Counted once produced: the numbers never run ahead of what reached Kafka.
                dead = sum(1 for m in out if m.topic == dlq)
                counted(source.topic, len(batch) - dead, dead)

    app.agent(topic, name=f"downconvert_{source.entity}")(downconvert_entity)
