"""What each agent has done: events taken in and finished, offsets, crashes and restarts.

`ProgressSensor` is a Faust sensor (`app.sensors.add`): it counts the events each agent's
streams take in (`on_stream_event_in`) and finish (`on_stream_event_out`, i.e. acked) and the
last offset finished per partition; crashes are counted by the agents' `on_error` hook. A
stream belongs to the agent whose name is its `prefix` (Faust names agent streams so). The
metrics, the status page and the watchdog read it.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.sensors import Sensor
from faust.types import TP, EventT, StreamT

from app.faust_compat import agent_error_handler, set_agent_error_handler

log = logging.getLogger(__name__)


@dataclass
class AgentProgress:
    """What one agent has done; the watchdog reads it and records its restarts here."""

    received: int = 0
    processed: int = 0
    errors: int = 0
    #: time.monotonic() of the last finished event; 0.0 = none yet.
    last_processed: float = 0.0
    #: Last offset finished per partition (the agent's own position, not the group's).
    offsets: dict[TP, int] = field(default_factory=dict)
    #: reason -> restarts ("crashed": Faust's supervisor after an exception; the rest: the watchdog).
    restarts: Counter[str] = field(default_factory=Counter)
    #: Why the watchdog gave up on the agent ("" while it has not).
    failing: str = ""

    @property
    def in_flight(self) -> int:
        """Events taken in and not finished yet."""
        return max(0, self.received - self.processed)


class ProgressSensor(Sensor):
    """Counts the events each agent takes in and finishes, and each agent's crashes."""

    def __init__(self, app: faust.App, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.agents: dict[str, AgentProgress] = {}
        #: time.monotonic() at install: the idle time of an agent that never finished an event.
        self.installed_at = time.monotonic()
        self._not_agents: set[str] = set()

    def progress(self, agent: str) -> AgentProgress:
        """The counts of `agent` (created on first use)."""
        found = self.agents.get(agent)
        if found is None:
            found = self.agents[agent] = AgentProgress()
        return found

    def _of(self, stream: StreamT) -> AgentProgress | None:
        name = stream.prefix
        found = self.agents.get(name)
        if found is None and name not in self._not_agents:
            if name and name in self.app.agents:
                return self.progress(name)
            self._not_agents.add(name)  # app.stream() and friends: not an agent's
        return found

    def on_stream_event_in(self, tp: TP, offset: int, stream: StreamT, event: EventT) -> dict | None:
        """Count an event an agent's stream took in."""
        progress = self._of(stream)
        if progress is not None:
            progress.received += 1
        return None

    def on_stream_event_out(self, tp: TP, offset: int, stream: StreamT, event: EventT,
                            state: dict | None = None) -> None:
        """Count an event an agent's stream finished (acked)."""
        progress = self._of(stream)
        if progress is not None:
            progress.processed += 1
            progress.last_processed = time.monotonic()
            if offset > progress.offsets.get(tp, -1):
                progress.offsets[tp] = offset

    async def on_start(self) -> None:
        """Hook the agents' crashes (agents declared after `install`, e.g. by tests, included)."""
        self.hook_errors()

    def hook_errors(self) -> None:
        """Count every exception that crashes an actor, through the agent's `on_error` handler."""
        for agent in self.app.agents.values():
            previous = agent_error_handler(agent)
            if getattr(previous, "counts_errors", False):
                continue
            set_agent_error_handler(agent, self._error_handler(agent.name, previous))

    def _error_handler(self, name: str, previous: Callable[..., Any] | None) -> Callable[..., Any]:
        async def on_error(agent: Any, exc: BaseException) -> None:
            progress = self.progress(name)
            progress.errors += 1
            progress.restarts["crashed"] += 1  # Faust's supervisor replaces the actor next
            log.warning("agent %s crashed (%s: %s); Faust restarts it", name, type(exc).__name__, exc)
            if previous is not None:
                await previous(agent, exc)

        on_error.counts_errors = True  # type: ignore[attr-defined]  # a marker on the function, read by the watchdog
        return on_error
