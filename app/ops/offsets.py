"""Where the worker's consumer stands in each assigned partition, and each agent's lag.

Read from what Faust exposes without network calls. Highwater is `app.consumer.highwater(tp)`
(the high watermark of the consumer's latest fetch response), else the Monitor's
`tp_end_offsets`; committed is the Monitor's `tp_committed_offsets` (this worker's commits),
else the offset the consumer read from the broker when the partition was assigned; read is
the Monitor's `tp_read_offsets` (last offset handed to streams). Lag = highwater - committed.
Tansu reports the high watermark at the start of the last batch, so there lag reads low by up
to one producer batch.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import faust
from faust.types import TP

from app.faust_compat import committed_offsets
from app.ops.progress import AgentProgress


@dataclass(frozen=True)
class PartitionOffsets:
    """Where the consumer stands in one assigned partition (see the module docstring)."""

    tp: TP
    highwater: int | None
    committed: int | None
    read: int | None

    @property
    def lag(self) -> int | None:
        """Messages not committed yet; None while the high watermark is unknown."""
        if self.highwater is None:
            return None
        return max(0, self.highwater - (self.committed or 0))


def agent_topics(app: faust.App) -> dict[str, set[str]]:
    """agent name -> the topics it reads."""
    return {name: set(agent.get_topic_names()) for name, agent in app.agents.items()}


def partition_offsets(app: faust.App, topics: Iterable[str]) -> list[PartitionOffsets]:
    """Offsets of the assigned partitions of `topics` (no network I/O); [] before the consumer runs."""
    wanted = set(topics)
    consumer = app.consumer
    try:
        assigned = consumer.assignment()
    except Exception:  # ConsumerNotStarted: nothing is assigned yet
        return []
    monitor = app.monitor
    committed_by_consumer = committed_offsets(consumer)
    out = []
    for tp in sorted(tp for tp in assigned if tp.topic in wanted):
        try:
            highwater = consumer.highwater(tp)
        except Exception:  # revoked between assignment() and here
            highwater = None
        if highwater is None:
            highwater = monitor.tp_end_offsets.get(tp)
        committed = monitor.tp_committed_offsets.get(tp)
        if committed is None:
            committed = committed_by_consumer.get(tp)
        out.append(PartitionOffsets(tp, highwater, committed, monitor.tp_read_offsets.get(tp)))
    return out


def agent_lag(progress: AgentProgress, topics: set[str], offsets: Iterable[PartitionOffsets]) -> int:
    """Messages in the agent's assigned input partitions it has not finished yet."""
    total = 0
    for p in offsets:
        if p.tp.topic not in topics or p.highwater is None:
            continue
        done = progress.offsets.get(p.tp)
        # After a rebalance the group may be past what this agent did here before.
        position = max(p.committed or 0, -1 if done is None else done + 1)
        total += max(0, p.highwater - position)
    return total
