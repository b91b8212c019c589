"""The promises on one topic: exactly one logical event per committed write, in per-key order."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from chaos.topiclog import Seen


@dataclass
class TopicCheck:
    """The promises on one topic."""

    topic: str
    events: int = 0          # distinct logical events (distinct event ids)
    duplicates: int = 0      # further copies of an event id
    lost: int = 0            # committed sequences with no event
    reordered: int = 0       # first copies arriving after a higher sequence of the key
    phantom: int = 0         # events beyond the committed sequence, or of rolled-back writes
    split: int = 0           # one sequence of a key under two event ids (two logical events)
    last: dict[str, Seen] = field(default_factory=dict)  # key -> its highest-sequence event
    examples: list[str] = field(default_factory=list)    # a few of what is broken, for the report

    @property
    def ok(self) -> bool:
        return not (self.lost or self.reordered or self.phantom or self.split)


def check_topic(topic: str, events: list[Seen], committed: dict[str, int]) -> TopicCheck:
    """Count lost, duplicated, reordered and phantom events of `topic` against `committed` (key -> n)."""
    out = TopicCheck(topic)
    by_key: dict[str, list[Seen]] = defaultdict(list)
    for seen in sorted(events, key=lambda s: (s.partition, s.offset)):
        by_key[seen.key].append(seen)
    for key, seen_list in by_key.items():
        ids: dict[str, int] = {}
        sequences: dict[int, str] = {}
        highest = 0
        for seen in seen_list:
            if seen.event_id in ids:
                out.duplicates += 1
                continue
            ids[seen.event_id] = seen.sequence
            if seen.sequence in sequences:
                out.split += 1
                continue
            sequences[seen.sequence] = seen.event_id
            if seen.sequence < highest:
                out.reordered += 1
            else:
                highest = seen.sequence
                out.last[key] = seen
            data = seen.data or {}
            if data.get("amount_cents", 0) < 0 or data.get("amount", 0) < 0:
                out.phantom += 1  # the marker of a rolled-back write
        n = committed.get(key, 0)
        out.phantom += sum(1 for s in sequences if s > n)
        missing = [s for s in range(1, n + 1) if s not in sequences]
        out.lost += len(missing)
        if missing and len(out.examples) < 5:
            out.examples.append(f"{topic} key {key} lost sequences {missing[:5]} "
                                f"(partition {seen_list[0].partition})")
        out.events += len(ids)
    # Keys with committed writes and not a single event.
    out.lost += sum(n for key, n in committed.items() if key not in by_key)
    return out
