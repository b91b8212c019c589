"""The down-conversion job: serves older schema versions by converting the current topic's events.

For each entity whose older versions are in `downconvert` mode (see `Order.__legacy__` and
`LEGACY_MODES`), the entity's `process_<entity>` agent (`agents/entity_pass.py`) runs this job
on every batch of `<entity>-v<current>` and writes `<entity>-v<old>` with the same key,
partition and event id. What cannot be decoded or converted goes to `<entity>-v<current>.dlq`
with the reason in headers; the agent keeps going.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from faust.types import EventT

from agents.entity_pass import Decoded
from app.settings import Settings
from app.topology import current_version, downconvert_targets
from app.wire.deadletter import dead_letter
from app.wire.messages import Incoming, Outgoing, downconvert_record, incoming
from app.wire.schemas import EventSchema, dlq_topic, load

#: Called after each produced batch with (source topic, events converted, events dead-lettered).
Counted = Callable[[str, int, int], None]


def convert_batch(source: EventSchema, targets: Sequence[int], batch: Sequence[Incoming],
                  records: Sequence[Decoded]) -> list[Outgoing]:
    """The messages to produce for `batch` and its decoded `records`, in order (pure: no I/O).

    Each target version keeps the source partition: the topics have equal partition counts,
    so per-key order carries over and dual-publish (key-hashed) lands in the same partition.
    """
    out: list[Outgoing] = []
    for msg, record in zip(batch, records, strict=True):
        try:
            if isinstance(record, Exception):
                raise record
            converted = [(v, downconvert_record(record, source, v)) for v in targets]
        except Exception as exc:  # anything undecodable or unconvertible is a dead letter
            out.append(dead_letter(source.topic, msg, exc))
            continue
        for version, (value, headers) in converted:
            out.append(Outgoing(load(source.entity, version).topic, msg.key, value, msg.partition, headers))
    return out


@dataclass
class Downconvert:
    """The down-conversion job of one entity, run by its `process_<entity>` agent."""

    source: EventSchema
    targets: list[int]
    counted: Counted | None = None
    stage: str = "downconvert"

    def run(self, events: Sequence[EventT], records: Sequence[Decoded]) -> list[Outgoing]:
        """Every target version of each event, or its dead letter."""
        return convert_batch(self.source, self.targets, [incoming(e.message) for e in events], records)

    def sent(self, out: list[Outgoing]) -> None:
        """Count the produced batch (converted events and dead letters)."""
        if self.counted is not None:
            dlq = dlq_topic(self.source.topic)
            dead = sum(1 for m in out if m.topic == dlq)
            self.counted(self.source.topic, (len(out) - dead) // len(self.targets), dead)


def jobs(settings: Settings, counted: Counted | None = None) -> dict[tuple[str, int], Downconvert]:
    """(entity, current version) -> its down-conversion job, for entities with versions in `downconvert` mode."""
    return {(entity, current_version(entity)): Downconvert(load(entity, current_version(entity)), targets, counted)
            for entity, targets in downconvert_targets(settings).items()}
