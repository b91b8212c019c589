"""How far behind a local copy of a table partition is, so a key lookup may accept it (`max_lag`).

A lookup the owner cannot answer (unknown, unreachable, or this worker mid-rebalance) may be
answered from this worker's own copy if the caller says how stale it may be. The figures come
from Faust's changelog recovery service, which tracks the offsets of active and standby
partitions; `Staleness` only reads them, and applies what Faust received but still buffers
through `app.faust_compat`.
"""
from __future__ import annotations

import faust
from faust.stores.memory import Store as MemoryStore
from faust.tables.recovery import Recovery
from faust.types import TP

from app.faust_compat import apply_buffered_changelog


class Staleness:
    """Estimates how many changelog messages a local copy of a table partition is behind.

    How good the estimate is:
    - "behind" is `end - applied`: `end` is the changelog's last offset as this worker knows
      it (the high watermark of the consumer's latest fetch of that partition, or the one
      Faust's recovery measured when the partition was assigned, whichever is larger);
      `applied` is the last offset Faust's recovery received for the partition, after the
      events it still buffers (`standby_buffer_size`, 1000 by default) have been applied.
      Offsets count messages, including ones compaction later removes, so the figure is an
      upper bound in that respect. Tansu reports a high watermark at the start of the last
      batch, so the end can be under-estimated by up to one producer batch. While the owner
      is alive the end moves on, so the figure is as old as the last fetch (milliseconds);
      after the owner died nobody writes the partition until it is reassigned, so the end
      is final.
    - With the in-memory store Faust drops every key of a standby partition it applied from
      the changelog when a recovery completes (`faust/stores/memory.py`,
      `on_recovery_completed`) and keeps reading from where it was: the copy then lacks
      whatever came before. Every message up to that point is counted as missing, which
      over-states the lag of keys written later but never under-states it. RocksDB stores
      keep their standby keys and are not penalised.
    - For a partition this worker owns while it rebalances, the figure is the recovery's
      remaining count once it is measured; before that, or for a partition kept through the
      rebalance, it also counts the worker's own writes since its last recovery (too high).
    - A partition this worker neither stands by for nor owns has no estimate (None).
    """

    def __init__(self, app: faust.App) -> None:
        """Estimates for `app`'s tables."""
        self.app = app
        # Changelog partition -> last offset applied before Faust purged the memory copy.
        self._purged: dict[TP, int] = {}

    @property
    def recovery(self) -> Recovery:
        """Faust's changelog recovery service: it tracks offsets of actives and standbys."""
        return self.app.tables.recovery  # type: ignore[attr-defined]  # TableManager has it, not TableManagerT

    def watch(self, table: faust.Table) -> None:
        """Record, after each recovery, what Faust purged from `table`'s memory standbys."""

        async def purged() -> None:
            """Note the standby offsets up to which the memory store just dropped keys."""
            recovery = self.recovery
            standbys = set(recovery.standbys_for_table.get(table, ()))
            for tp in [tp for tp in self._purged if tp.topic == table.changelog_topic.get_topic_name()]:
                if tp not in standbys:
                    del self._purged[tp]
            if not isinstance(table.data, MemoryStore):
                return
            for tp in standbys:
                offset = recovery.standby_offsets.get(tp)
                self._purged[tp] = -1 if offset is None else offset

        table.on_recover(purged)

    def apply_received(self, table: faust.Table) -> None:
        """Apply changelog events Faust received for `table` but still buffers."""
        if self.app.conf.web_in_thread:
            return  # the web server runs in another thread: Faust's state is not ours to touch
        apply_buffered_changelog(self.recovery, table)

    def lag(self, table: faust.Table, tp: TP) -> int | None:
        """Estimated changelog messages the local copy of `tp` is behind; None if unknown."""
        recovery = self.recovery
        if tp in recovery.standby_tps:
            applied, measured = recovery.standby_offsets.get(tp), recovery.standby_highwaters.get(tp)
        elif tp in recovery.active_tps:
            # Active offsets advance only while recovering: a partition kept through the
            # rebalance counts its own writes since the last recovery too (an over-estimate).
            applied, measured = recovery.active_offsets.get(tp), recovery.active_highwaters.get(tp)
        else:
            return None
        applied = -1 if applied is None else applied
        ends = [end for end in (measured, self.fetched_end(tp)) if end is not None]
        end = max(ends, default=applied)
        pending = sum(1 for event in recovery.buffers.get(table, ()) if event.message.tp == tp)
        purged = self._purged.get(tp, -1) + 1 if tp in recovery.standby_tps else 0
        return max(0, end - applied) + pending + purged

    def rebalancing(self) -> bool:
        """Whether this worker is between losing its partitions and having recovered the new ones."""
        # Faust's own route_req answers from the table then too; its copy may be incomplete.
        return bool(getattr(self.app, "rebalancing", False)) or self.recovery.in_recovery

    def fetched_end(self, tp: TP) -> int | None:
        """Last offset of `tp` per the consumer's latest fetch (no network); None if unknown."""
        try:
            highwater = self.app.consumer.highwater(tp)
        except Exception:  # not assigned (mid-rebalance) or consumer not started
            return None
        return None if highwater is None else highwater - 1
