"""The commit rule: an input partition's commit only ever covers processed offsets.

Faust 0.15.3 commits "the first consecutive run of acked offsets" of a partition, guarded at
its head only when more than one offset is missing (`Consumer._new_offset`: committed 10 and
acked [11, 12] commits 13, though 10 was never processed), with no guard at all while the
committed offset is unknown (after a revocation, or a partition never committed), and it counts
a jump between two delivered offsets as done (`_add_gap`). Each of these turns one dropped
message into a lost one (faust-streaming#606; the fix, PR #707, is not merged).

Here a commit covers a consecutive run of acked offsets that starts exactly at the partition's
base: the committed offset read at the last seek, or the end of our last commit. While the
base is unknown nothing is committed. An ack below the base is a message processed again after
a rewind: it is dropped. A run that does not start at the base is held, and how long it has
been held is kept: a hole at the head with processed offsets above it means one message was
dropped before any agent finished it (the consumer seeks back to the base then; see
`app.transport.FetchWaitConsumer`).
"""
from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

TPKey = TypeVar("TPKey", bound=Hashable)


@dataclass
class CommitGuard(Generic[TPKey]):
    """Per partition: where the next commit must start, and what the rule held back."""

    #: tp -> the offset the next commit must start at (Kafka's committed offset: the next to read).
    base: dict[TPKey, int] = field(default_factory=dict)
    #: tp -> time (monotonic) since when the run of acked offsets has not started at the base.
    held_since: dict[TPKey, float] = field(default_factory=dict)
    #: Commits a rule that skipped an unacked offset would have made: counted, never made.
    commits_refused: int = 0
    #: Commits made while the committed offset Faust knew was not the lowest acked one (must stay 0).
    commits_past_unacked: int = 0
    #: Delivered offsets that jumped past the next expected one, per tp (logged, never filled).
    offset_jumps: Counter[TPKey] = field(default_factory=Counter)
    #: Times a held partition was sought back to its base (a dropped message read again).
    reseeks: int = 0

    def start_at(self, tp: TPKey, offset: int) -> None:
        """The consumer (re)starts `tp` at `offset`: the next commit must start there."""
        self.base[tp] = offset
        self.held_since.pop(tp, None)

    def forget(self, tps: Iterable[TPKey]) -> None:
        """`tps` were revoked: their base is unknown until the next seek."""
        for tp in tps:
            self.base.pop(tp, None)
            self.held_since.pop(tp, None)

    def next_commit(self, tp: TPKey, acked: list[int], acked_index: set[int], now: float,
                    known_committed: int | None = None) -> int | None:
        """The offset to commit for `tp` (consuming its run from `acked`), or None to hold.

        `acked` is the sorted-or-not list of acked offsets and `acked_index` its set, both
        Faust's and updated in place. `known_committed` is the committed offset Faust knows,
        for the `commits_past_unacked` check.
        """
        if not acked:
            self.held_since.pop(tp, None)
            return None
        acked.sort()
        # Faust's guard holds only when the committed offset is known, non-zero and more than
        # one below the lowest ack (faust/transport/consumer.py `_new_offset`).
        faust_commits = not known_committed or acked[0] - known_committed <= 1
        base = self.base.get(tp)
        if base is None:
            self.commits_refused += faust_commits
            return None
        stale = bisect_left(acked, base)
        if stale:
            acked_index.difference_update(acked[:stale])
            del acked[:stale]
        if not acked:
            self.held_since.pop(tp, None)
            return None
        if acked[0] != base:
            self.commits_refused += faust_commits
            self.held_since.setdefault(tp, now)
            return None
        end = 1
        while end < len(acked) and acked[end] == acked[end - 1] + 1:
            end += 1
        run = acked[:end]
        del acked[:end]
        acked_index.difference_update(run)
        if known_committed is not None and known_committed != run[0]:
            self.commits_past_unacked += 1
        self.held_since.pop(tp, None)
        self.base[tp] = run[-1] + 1
        return run[-1] + 1
