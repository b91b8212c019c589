"""The watchdog that restarts dead or stalled agents and reports stuck ones (readiness: `app.ops.health`).

How the watchdog decides (every `check_interval` seconds, once tables are recovered and no
rebalance is under way):
- Dead: the agent has no running actor (its tasks crashed or returned). Faust's supervisor
  replaces crashed actors itself (the watchdog wakes it up; it also polls every 5 s). An
  agent still dead after `dead_after` seconds is restarted: actors that returned are marked
  crashed so the supervisor replaces them; without a working supervisor the agent is
  stopped and started (new streams).
- Stalled: for `stall_after` seconds the agent finished no event, while it holds events
  (taken in, not finished), its assigned input partitions hold messages it has not finished
  (highwater > its position), and one of its actors stayed parked on the very same awaitable.
  The last condition tells a deadlock from a retry loop: the cache and down-conversion agents
  retry Redis or the broker with a fresh sleep each round and are left alone. A stalled
  actor's task is cancelled: Faust takes that for a crash and its supervisor starts a new
  actor on the same stream, so events already buffered for the agent are kept.
- Stuck (reported, never restarted): for `stuck_after` seconds (default 30) the agent has
  retried the same batch (`app.retries`: Redis or the broker refusing it), or finished no
  event while its input partitions held messages for it. `/health/ready` names the agent and
  the error, `/status` shows it red, `mse_agent_stuck` is 1, and the log says it once per
  `stuck_after` instead of at every retry.
- Each watchdog restart is an attempt; an event taken in after the last restart and finished
  resets the count. After `max_attempts` restarts without progress the agent is failing
  (readiness 503, `mse_agent_failing`); the watchdog keeps trying with exponential backoff
  (at most `max_backoff` seconds apart).

Trap: a restart skips what the actor was holding. Faust acks the event an actor was handling
when that actor's stream iteration is closed (as it does for an event that raised), and a
batching agent (`agents/batching.take_ready`) also strands the events its background drainer
had already moved into the old batch: never acked, they stop the partition's committed offset there (visible
in `mse_consumer_lag`) until a rebalance or restart delivers them again. Hence the default
`stall_after`: longer than any broker wait, so only a true deadlock is ever restarted.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
from mode import Service

from app.errors import EventsError
from app.ops.actors import actors_of, await_chain, await_leaf, is_running
from app.ops.liveness import ConsumerLiveness
from app.ops.offsets import agent_lag, agent_topics, partition_offsets
from app.ops.progress import AgentProgress, ProgressSensor
from app.retries import Backoff, retries_of

if TYPE_CHECKING:
    from faust.types import AgentT
    from faust.types.agents import ActorRefT

log = logging.getLogger(__name__)


class AgentFinished(EventsError):
    """An agent's function returned: its actor is marked crashed with this so Faust replaces it."""


@dataclass(frozen=True)
class WatchdogPolicy:
    """When the watchdog restarts agents and when it reports them failing."""

    check_interval: float = 1.0
    #: Seconds an agent may hold events with lag, parked on one await, before it is restarted.
    #: None: a minute longer than the producer's request timeout (Faust's
    #: `producer_request_timeout`, 20 min by default), so an agent waiting for broker acks
    #: through an outage is never restarted (that would drop its batch): by then every
    #: legitimate await has timed out and turned into a retry.
    stall_after: float | None = None
    #: Seconds an agent may have no running actor (Faust's supervisor polls every 5 s).
    dead_after: float = 10.0
    #: Restarts without progress in between before the agent counts as failing.
    max_attempts: int = 3
    #: Upper bound of the backoff between restarts of a failing agent.
    max_backoff: float = 600.0
    #: Seconds of retrying one batch, or of no progress with lag, before an agent counts as stuck.
    stuck_after: float = 30.0
    #: Seconds of no fetch before the consumer counts as stalled (`app.ops.liveness`).
    consumer_stall_after: float = 30.0
    #: Seconds an input partition's commit may be held by an unprocessed head before it is
    #: read again from there (`app.transport.FetchWaitConsumer.reseek_held`).
    reseek_after: float = 5.0

    def stall_seconds(self, app: faust.App) -> float:
        """`stall_after`, or its default for `app`."""
        if self.stall_after is not None:
            return self.stall_after
        return float(app.conf.producer_request_timeout) + 60.0


@dataclass
class AgentWatch:
    """The watchdog's memory of one agent."""

    since: float
    attempts: int = 0
    last_restart: float = 0.0
    received_at_restart: int = 0
    dead_since: float | None = None
    #: actor -> (the awaitable it is parked on, since when).
    parked: dict[Any, tuple[Any, float]] = field(default_factory=dict)
    state: str = "running"
    #: time.monotonic() since when the agent has had lag (None: none at the last check).
    lag_since: float | None = None
    #: Why the agent is stuck ("" while it is not), and when that was last logged.
    stuck: str = ""
    stuck_logged: float = 0.0


class Watchdog(Service):
    """Restarts dead and stalled agents, and reports the ones it could not bring back."""

    def __init__(self, app: faust.App, progress: ProgressSensor, policy: WatchdogPolicy | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.progress = progress
        self.policy = policy or WatchdogPolicy()
        self.retries = retries_of(app)
        self.watches: dict[str, AgentWatch] = {}
        self.liveness = ConsumerLiveness(app, self.policy.consumer_stall_after)
        #: How late the last check woke up: the event loop's responsiveness.
        self.loop_lag = 0.0

    @Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            interval = self.policy.check_interval
            started = time.monotonic()
            await self.sleep(interval)
            if self.should_stop:
                break
            self.loop_lag = max(0.0, time.monotonic() - started - interval)
            try:
                # Before `check`: a stalled consumer often never lets the worker settle.
                self.liveness.check()
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watchdog must outlive whatever it trips over
                log.exception("watchdog: check failed")

    def settled(self) -> bool:
        """Whether partitions are assigned and recovered: actors are not being moved around."""
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]  # on TableManager, not TableManagerT
        return recovery.completed.is_set() and not recovery.in_recovery and not self.app.rebalancing

    async def check(self) -> None:
        """Look at every agent once; restart the dead and the stalled."""
        if not self.settled():
            return
        reseek = getattr(self.app.consumer, "reseek_held", None)
        if reseek is not None:
            await reseek(self.policy.reseek_after)
        now = time.monotonic()
        topics = agent_topics(self.app)
        offsets = partition_offsets(self.app, set().union(*topics.values()) if topics else ())
        for name, agent in list(self.app.agents.items()):
            if not agent.started or agent.should_stop or agent.supervisor is None:
                continue
            watch = self.watches.get(name)
            if watch is None:
                watch = self.watches[name] = AgentWatch(since=now)
            await self.check_agent(name, agent, watch, agent_lag(self.progress.progress(name),
                                                                  topics.get(name, set()), offsets), now)

    async def check_agent(self, name: str, agent: AgentT, watch: AgentWatch, lag: int, now: float) -> None:
        """Restart one agent if it is dead or stalled; track whether restarts help."""
        policy = self.policy
        stall_after = policy.stall_seconds(self.app)
        progress = self.progress.progress(name)
        if watch.attempts and progress.processed > watch.received_at_restart:
            # It finished an event taken in after the last restart: it works again.
            log.info("watchdog: agent %s makes progress again after %d restart(s)", name, watch.attempts)
            watch.attempts = 0
            progress.failing = ""
        actors = actors_of(agent)
        running = [a for a in actors if is_running(a)]
        watch.parked = {a: seen for a, seen in watch.parked.items() if a in running}
        if not running:
            watch.state = "dead"
            if watch.dead_since is None:
                watch.dead_since = now
                crashed = [a for a in actors if a.crashed]
                if crashed and agent.supervisor is not None:
                    # Faust replaces crashed actors, but only ones its supervisor has started,
                    # which it does for replacements on its next round (up to 5 s later).
                    for actor in crashed:
                        await actor.maybe_start()
                    agent.supervisor.wakeup()
            elif now - watch.dead_since >= policy.dead_after and self._may_restart(watch, policy.dead_after, now):
                reason = "finished" if actors and not any(a.crashed for a in actors) else "dead"
                # Dead since before the last restart: replacing did not work.
                again = watch.last_restart > watch.dead_since
                await self._restart_dead(name, agent, actors, again)
                self._restarted(name, watch, reason, lag, now)
        else:
            watch.dead_since = None
            stalled = []
            for actor in running:
                leaf = await_leaf(actor)
                seen = watch.parked.get(actor)
                if seen is None or seen[0] is not leaf:
                    watch.parked[actor] = (leaf, now)
                elif now - seen[1] >= stall_after:
                    stalled.append(actor)
            idle = now - max(progress.last_processed, watch.last_restart, watch.since)
            is_stalled = bool(stalled) and progress.in_flight > 0 and lag > 0 and idle >= stall_after
            watch.state = "stalled" if is_stalled else "running"
            if is_stalled and self._may_restart(watch, stall_after, now):
                for actor in stalled:
                    # Faust's _execute_actor turns this into a crash; its supervisor then starts
                    # a new actor on the same stream (only for actors it has started: see above).
                    await actor.maybe_start()
                    task = actor.actor_task
                    if task is not None:
                        task.cancel()
                    watch.parked.pop(actor, None)
                self._restarted(name, watch, "stalled", lag, now)
        self._check_stuck(name, watch, progress, lag, now)
        if watch.attempts >= policy.max_attempts:
            progress.failing = (f"{watch.state} after {watch.attempts} restart(s) without progress"
                                if watch.state != "running" else
                                f"no progress after {watch.attempts} restart(s)")
            watch.state = "failing"

    def _check_stuck(self, name: str, watch: AgentWatch, progress: AgentProgress, lag: int, now: float) -> None:
        """Note (and log once per `stuck_after`) an agent retrying one batch or idle with lag."""
        after = self.policy.stuck_after
        if lag <= 0:
            watch.lag_since = None
        elif watch.lag_since is None:
            watch.lag_since = now
        retrying = self.retries.current.get(name)
        stuck_for = now - retrying.since if retrying is not None else 0.0
        if watch.lag_since is not None:
            # Progress counts from when lag appeared: an agent idle for an hour is not stuck
            # the moment a rebalance hands it a partition with messages.
            stuck_for = max(stuck_for, now - max(progress.last_processed, watch.lag_since, watch.since))
        why = ""
        if stuck_for >= after:
            # The error it retries on says more than "no progress": name it when there is one.
            why = (f"retrying the same batch for {now - retrying.since:.0f} s ({retrying.attempts} attempts): "
                   f"{retrying.error}" if retrying is not None else
                   f"no event finished for {stuck_for:.0f} s while {lag} message(s) wait")
        if why and (not watch.stuck or now - watch.stuck_logged >= after):
            agent = self.app.agents.get(name)
            where = "; ".join(await_chain(a) for a in actors_of(agent) if is_running(a)) if agent else ""
            log.warning("watchdog: agent %s is stuck: %s (waiting in: %s)", name, why, where or "nothing")
            watch.stuck_logged = now
        elif watch.stuck and not why:
            log.info("watchdog: agent %s is no longer stuck", name)
        watch.stuck = why
        if why and watch.state == "running":
            watch.state = "stuck"

    def stuck(self) -> dict[str, str]:
        """agent -> why it is stuck (as of the last check)."""
        return {name: watch.stuck for name, watch in self.watches.items() if watch.stuck}

    def _may_restart(self, watch: AgentWatch, base: float, now: float) -> bool:
        """Whether enough time passed since the last restart (backing off once failing)."""
        over = watch.attempts - self.policy.max_attempts
        # Not a loop: the wait is computed from the restart count kept per agent.
        wait = base if over < 0 else Backoff(base, self.policy.max_backoff).delay(over + 1)
        return now - watch.last_restart >= wait

    async def _restart_dead(self, name: str, agent: AgentT, actors: list[ActorRefT], again: bool) -> None:
        """Have the supervisor replace dead actors; the second time in a row, restart the agent."""
        supervisor = agent.supervisor
        if not again and supervisor is not None and supervisor.started and not supervisor.should_stop:
            for actor in actors:
                if is_running(actor):
                    continue
                # Faust's supervisor starts a replacement actor only on its next round (up to
                # 5 s later) and ignores actors it has not started: start it here first.
                await actor.maybe_start()
                if not actor.crashed:
                    await actor.crash(AgentFinished(f"agent {name} returned"))
            supervisor.wakeup()
            return
        # Stopping and starting the agent gives it new streams: events buffered in the old
        # ones are stranded (never acked) until the next rebalance. Only when replacing failed.
        log.warning("watchdog: restarting agent %s from scratch", name)
        await agent.restart()

    def _restarted(self, name: str, watch: AgentWatch, reason: str, lag: int, now: float) -> None:
        progress = self.progress.progress(name)
        watch.attempts += 1
        watch.last_restart = now
        watch.received_at_restart = progress.received
        progress.restarts[reason] += 1
        log.warning("watchdog: restarted agent %s (%s; attempt %d; %d in flight; lag %d)",
                    name, reason, watch.attempts, progress.in_flight, lag)

    def failing(self) -> dict[str, str]:
        """agent -> why the watchdog gave up on it."""
        return {name: p.failing for name, p in self.progress.agents.items() if p.failing}

    def running(self) -> set[str]:
        """Agents that have a running actor now."""
        return {name for name, agent in self.app.agents.items() if any(is_running(a) for a in actors_of(agent))}

    def states(self) -> dict[str, str]:
        """agent -> running | stuck | stalled | dead | failing (as of the last check)."""
        return {name: watch.state for name, watch in self.watches.items()}
