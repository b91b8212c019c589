"""Exponential backoff, retry loops that never give up on a batch, and who is retrying what, since when.

`Backoff` is the one backoff schedule: the agents' batch retries (`Retries.until_done`), the
relay's reconnects (app/outbox/relay.py) and the watchdog's restarts of a failing agent
(app/ops/watchdog.py) each use it with their own bounds.

The agents must not lose an event, so a batch Redis or the broker refuses is retried until it
goes through. That must not be silent: `Retries` keeps, per stage, since when it has been
retrying the same batch and the last error (the watchdog turns that into a "stuck" state for
`/health/ready`, `/status` and `mse_agent_stuck`), and logs it once per `log_interval`
instead of at every attempt.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Backoff:
    """Delays doubling from `first` up to `maximum`: `next()` after each failure, `reset()` after a success."""

    def __init__(self, first: float, maximum: float) -> None:
        self.first = first
        self.maximum = maximum
        self.failures = 0

    def delay(self, failures: int) -> float:
        """The delay after `failures` earlier consecutive failures: first * 2**failures, at most `maximum`."""
        # Capped exponent: 2.0 ** 1000 is still a float, so a long outage cannot overflow.
        return min(self.maximum, self.first * 2.0 ** min(failures, 1000))

    def next(self) -> float:
        """The delay to wait before the next attempt; counts one more failure."""
        seconds = self.delay(self.failures)
        self.failures += 1
        return seconds

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits `first` again."""
        self.failures = 0


@dataclass
class Retrying:
    """A stage retrying the same batch."""

    since: float  # time.monotonic() of the first failed attempt
    attempts: int
    error: str


class Retries:
    """stage (agent name) -> the batch it is retrying, if any."""

    def __init__(self, log_interval: float = 30.0) -> None:
        self.log_interval = log_interval
        self.current: dict[str, Retrying] = {}
        self._logged: dict[str, float] = {}

    def failed(self, stage: str, exc: BaseException) -> Retrying:
        """Record a failed attempt; log the first one, then once per `log_interval`."""
        now = time.monotonic()
        error = f"{type(exc).__name__}: {exc}"
        state = self.current.get(stage)
        if state is None:
            state = self.current[stage] = Retrying(since=now, attempts=0, error=error)
        state.attempts += 1
        state.error = error
        if now - self._logged.get(stage, float("-inf")) >= self.log_interval:
            self._logged[stage] = now
            log.warning("%s: retrying the same batch (attempt %d, for %.0f s): %s",
                        stage, state.attempts, now - state.since, error)
        return state

    def succeeded(self, stage: str) -> None:
        """The stage's batch went through: forget its retries."""
        state = self.current.pop(stage, None)
        if state is not None:
            self._logged.pop(stage, None)
            log.info("%s: batch went through after %d failed attempt(s) in %.1f s",
                     stage, state.attempts, time.monotonic() - state.since)

    async def until_done(self, stage: str, attempt: Callable[[], Awaitable[T]], *,
                         first_backoff: float = 0.05, max_backoff: float = 2.0) -> T:
        """Run `attempt` until it succeeds, with exponential backoff between failures."""
        backoff = Backoff(first_backoff, max_backoff)
        while True:
            try:
                result = await attempt()
            except asyncio.CancelledError:
                self.current.pop(stage, None)  # abandoned (stop, restart): no longer retrying
                self._logged.pop(stage, None)
                raise
            except Exception as exc:  # the batch is not acked until it goes through: never lose it
                self.failed(stage, exc)
                await asyncio.sleep(backoff.next())
                continue
            self.succeeded(stage)
            return result


def retries_of(app: object) -> Retries:
    """The app's `Retries` (our `App` has one; a plain Faust app gets one on first use)."""
    found = getattr(app, "retries", None)
    if found is None:
        found = Retries()
        setattr(app, "retries", found)
    return found
