"""The consumer's liveness rule: a worker whose Kafka consumer stopped for good exits non-zero.

Faust's worker can log "Worker ready" and then never fetch again: aiokafka's group coordinator
parks on an error until someone reads it (Faust never does: `app.transport` now does), a
position reset waits for a commit-refresh task that died, and one stuck partition stops every
fetch to its node; or Faust's table recovery loop ends on a step timeout and no rebalance
completes after it. Nothing in the process can restart those pieces (aiokafka's consumer is not
restartable in place, and Faust builds it once), so the rule's remedy is the process: readiness
goes 503 naming the cause, the consumer state is logged, and the worker exits with
`STALL_EXIT_CODE` for its supervisor (Compose `restart:`, Kubernetes, the chaos stack) to start
it again. Its partitions are read again from their committed offsets (at least once; every
stage is idempotent), as after a crash.

A stall is one of:
- a background task of the consumer ended (the fetcher's routine, the coordinator's
  coordination, heartbeat or commit-refresh task) while the worker runs;
- the table recovery loop ended while the worker runs;
- for `stall_after` seconds without a break: an assigned, unpaused partition got no fetch
  response, no fetch request is out, and the fetcher holds no records waiting to be taken
  (those mean the agents are the slow part: the watchdog's business). A broker that is down or
  paused keeps a request out, so an outage is not a stall;
- for `untaken_after` seconds without a break (5, or `stall_after` if shorter), outside a
  rebalance: the fetcher holds records the drain loop should take, every queue it delivers
  into is empty, and it delivered nothing since the last look (no read offset moved): the one
  loop that hands fetched messages to the agents is not running (a full queue, the agents'
  back-pressure, would show). Empty queues alone do not say so: a loop working through a long
  run of standby changelog records, or flushing the producer buffer before each message,
  keeps them at 0 while other partitions' records wait their turn (a worker started onto a
  backlog was once restarted for nothing that way).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from app.faust_compat import (
    consumer_task_errors,
    delivery_queues,
    fetch_in_flight,
    fetch_states,
    flow_partitions,
    kafka_consumer,
    read_offsets,
    recovery_task,
)
from app.ops.consumer_state import consumer_state

log = logging.getLogger(__name__)

#: EX_TEMPFAIL: the stall is the process's, a new one starts clean.
STALL_EXIT_CODE = 75


class ConsumerLiveness:
    """Finds a stalled consumer (see the module docstring) and ends the process."""

    def __init__(self, app: Any, stall_after: float, *, grace: float = 2.0, untaken_after: float = 5.0,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.app = app
        self.stall_after = stall_after
        self.untaken_after = min(untaken_after, stall_after)
        #: Seconds between reporting a stall (readiness 503) and exiting.
        self.grace = grace
        self._exit = exit
        #: Why the consumer is stalled ("" while it is not).
        self.stalled = ""
        self._stalled_at = 0.0
        #: When the "no fetch" condition started to hold without a break (None: it does not).
        self._unfetched_since: float | None = None
        #: When "records fetched, not taken, nothing queued" started to hold without a break.
        self._untaken_since: float | None = None
        #: Whether the recovery loop's task was seen running (mode forgets a task once it ends).
        self._recovery_seen = False
        #: The drain loop's read offsets at the last look (None: no look yet): a change is a
        #: message delivered.
        self._delivered: tuple[tuple[str, Any], ...] | None = None

    def check(self, now: float | None = None) -> str:
        """Look once; on a stall, report it and exit after `grace` s. Returns the reason or ""."""
        now = time.monotonic() if now is None else now
        if self.app.should_stop:
            return ""
        if self.stalled:
            if now - self._stalled_at >= self.grace:
                self._end()
            return self.stalled
        why = self._why(now)
        if why:
            self.stalled, self._stalled_at = why, now
            log.error("liveness: the consumer is stalled: %s; exiting with %d for the supervisor to "
                      "restart the worker; consumer state: %s", why, STALL_EXIT_CODE, self._state())
        return why

    def _why(self, now: float) -> str:
        recovery = recovery_task(self.app.tables.recovery)
        if recovery is not None:
            self._recovery_seen = True
        if self._recovery_seen and (recovery is None or recovery.done()):
            return "the table recovery loop ended (no rebalance can complete)"
        consumer = kafka_consumer(self.app)
        if consumer is None or getattr(consumer, "_closed", True):
            self._unfetched_since = None
            return ""
        ended = consumer_task_errors(consumer)
        if ended:
            return "aiokafka's " + ", ".join(f"{name} task {how}" for name, how in sorted(ended.items()))
        if self._held(self._untaken(consumer), "_untaken_since", now, self.untaken_after):
            return (f"fetched records not taken for {self.untaken_after:.0f} s while every delivery queue is "
                    f"empty (the drain loop does not run)")
        unfetched = self._unfetched(consumer)
        if not self._held(bool(unfetched), "_unfetched_since", now, self.stall_after):
            return ""
        names = ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(unfetched)[:8])
        return (f"no fetch response for {self.stall_after:.0f} s on {len(unfetched)} assigned partition(s) "
                f"({names}) and no fetch request out")

    def _held(self, condition: bool, since: str, now: float, after: float) -> bool:
        """Whether `condition` has held without a break for `after` s (tracked in `since`)."""
        if not condition:
            setattr(self, since, None)
            return False
        if getattr(self, since) is None:
            setattr(self, since, now)
        return bool(now - getattr(self, since) >= after)

    def _untaken(self, consumer: Any) -> bool:
        """Records wait in the fetcher while nothing is queued for the agents and nothing was
        delivered since the last look, the flow running."""
        app = self.app
        delivered = tuple(sorted((str(tp), offset) for tp, offset in list(read_offsets(app.consumer).items())))
        moved = self._delivered is not None and delivered != self._delivered
        self._delivered = delivered
        if moved:
            return False  # the drain loop delivered a message: it runs, however slowly
        recovery = app.tables.recovery
        if (app.rebalancing or not recovery.completed.is_set() or recovery.in_recovery
                or not getattr(app.consumer, "flow_active", False) or not app.flow_control.is_active()):
            return False  # the drain loop waits for the rebalance, as it should
        # Only partitions the drain loop takes from: Faust leaves the others' records (paused,
        # or their stream's buffer full) in the fetcher on purpose.
        sets = flow_partitions(app.consumer)
        takes = sets["active"] - sets["paused"] - sets["buffered"]
        try:
            waiting = any(state.buffered and tp in takes for tp, state in fetch_states(consumer).items())
        except RuntimeError:
            return False
        if not waiting:
            return False
        # The queues the drain loop fills: one with events in it means some agent has work
        # (a full one blocks the loop: back-pressure, the watchdog's business).
        return not any(queue.qsize() for _, queue in delivery_queues(app))

    def _unfetched(self, consumer: Any) -> list[Any]:
        """Assigned, unpaused partitions with no recent fetch response, while nothing explains it."""
        try:
            if fetch_in_flight(consumer):
                return []
            states = fetch_states(consumer)
        except RuntimeError:  # changed under us by the consumer's thread: look again next time
            return []
        if any(state.buffered for state in states.values()):
            return []  # the agents have not taken what was fetched: back-pressure, not a stall
        wall = time.time()
        return [tp for tp, state in states.items() if not state.paused
                and (state.fetched_at is None or wall - state.fetched_at >= self.stall_after)]

    def _state(self) -> str:
        try:
            return json.dumps(consumer_state(self.app), default=str)
        except Exception as exc:  # the dump is a diagnostic: never let it stop the exit
            return f"(dump failed: {exc!r})"

    def _end(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(STALL_EXIT_CODE)
