"""The down-conversion promise: per partition, the copies are the inputs, one each, in the inputs' order.

The down-converter writes each valid `orders-v2` event to `orders-v1` with the same key,
partition and event id, at least once. So per partition, the first copy of each event id on
`orders-v1`, in offset order, must be exactly the distinct event ids on `orders-v2`, in offset
order (poison is dead-lettered, not copied: the caller leaves it out of the inputs). This is
stricter than the per-key check of each topic: it names the input offset of a lost event, to
compare with the committed offset at the last rebalance.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from chaos.topiclog import Seen


@dataclass
class CopyCheck:
    """What breaks the one-to-one mapping of inputs to copies."""

    missing: int = 0     # inputs without a copy
    reordered: int = 0   # copies out of the inputs' order (the fewest that, moved, restore it)
    unexpected: int = 0  # copies of no input
    examples: list[str] = field(default_factory=list)

    @property
    def broken(self) -> int:
        return self.missing + self.reordered + self.unexpected

    def example(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


def first_copies(events: Iterable[Seen]) -> dict[int, list[Seen]]:
    """Partition -> the first message of each event id, in offset order."""
    seen: set[str] = set()
    out: dict[int, list[Seen]] = defaultdict(list)
    for event in sorted(events, key=lambda e: (e.partition, e.offset)):
        if event.event_id not in seen:
            seen.add(event.event_id)
            out[event.partition].append(event)
    return out


def in_order(positions: list[int]) -> set[int]:
    """Indexes of a longest increasing subsequence of `positions`: what is in order."""
    tails: list[int] = []          # tails[k]: the smallest position ending an increasing run of k + 1
    tail_at: list[int] = []        # its index in `positions`
    before = [-1] * len(positions)  # the previous index of the run ending at each index
    for i, position in enumerate(positions):
        k = bisect_left(tails, position)
        before[i] = tail_at[k - 1] if k else -1
        if k == len(tails):
            tails.append(position)
            tail_at.append(i)
        else:
            tails[k], tail_at[k] = position, i
    kept: set[int] = set()
    i = tail_at[-1] if tail_at else -1
    while i >= 0:
        kept.add(i)
        i = before[i]
    return kept


def check_copies(inputs: Iterable[Seen], copies: Iterable[Seen], input_topic: str = "orders-v2",
                 copy_topic: str = "orders-v1") -> CopyCheck:
    """Compare, per partition, the first copies on `copy_topic` with the inputs on `input_topic`."""
    out = CopyCheck()
    wanted, got = first_copies(inputs), first_copies(copies)
    for partition in sorted(wanted.keys() | got.keys()):
        want, have = wanted.get(partition, []), got.get(partition, [])
        position = {event.event_id: i for i, event in enumerate(want)}
        copied = {event.event_id for event in have}
        for event in want:
            if event.event_id not in copied:
                out.missing += 1
                out.example(f"{copy_topic} partition {partition}: no copy of {input_topic} offset {event.offset} "
                            f"(key {event.key}, sequence {event.sequence})")
        for event in have:
            if event.event_id not in position:
                out.unexpected += 1
                out.example(f"{copy_topic} partition {partition} offset {event.offset} (key {event.key}, "
                            f"sequence {event.sequence}): a copy of no {input_topic} event")
        common = [event for event in have if event.event_id in position]
        kept = in_order([position[event.event_id] for event in common])
        for i, event in enumerate(common):
            if i not in kept:
                out.reordered += 1
                source = want[position[event.event_id]]
                out.example(f"{copy_topic} partition {partition} offset {event.offset}: the copy of {input_topic} "
                            f"offset {source.offset} (key {event.key}, sequence {event.sequence}) is out of order")
    return out
