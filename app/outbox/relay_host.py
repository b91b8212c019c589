"""Where the worker runs its outbox relay (`RELAY_MODE`): a child process it supervises (the
default), a thread with an event loop of its own, or the stream agents' own event loop.

On the agents' loop every step of the relay (fetch the rows, send, wait for the acks, delete)
waits for a turn of a loop that is busy with whole batches: at 500 commits/s an event reached
`orders-v2` ~350 ms after its commit there (bench/freshness.py; docs/performance.md). A thread
has its own loop but shares the interpreter lock, and a child process has a core of its own.
`bench/freshness.py` measures the three; the README's Figures say which won, and why.

Every host exposes the same `stats` (`RelayStats`), which `/health`, `/metrics` and `/status`
read; `start()` and `stop()` are awaited by the worker's lifecycle service.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import IO, Protocol

from app.outbox.relay import Relay, RelayStats
from app.retries import Backoff
from app.settings import Settings

log = logging.getLogger(__name__)

#: How often a supervised relay process reports its stats to the worker, in seconds.
REPORT_INTERVAL = 0.5
#: How long a stopping relay may take to finish its batch before it is killed, in seconds.
STOP_TIMEOUT = 10.0


class RelayHost(Protocol):
    """A relay the worker runs: started and stopped with it, its stats read live."""

    @property
    def stats(self) -> RelayStats: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LoopRelay:
    """The relay as a task on the worker's own event loop (`RELAY_MODE=loop`)."""

    def __init__(self, settings: Settings) -> None:
        self._relay = Relay(settings)
        self._task: asyncio.Task[None] | None = None

    @property
    def stats(self) -> RelayStats:
        return self._relay.stats

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._relay.run())

    async def stop(self) -> None:
        self._relay.stop()
        if self._task is not None:
            try:  # it finishes its batch; a connect that hangs is cancelled
                await asyncio.wait_for(self._task, STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("relay did not stop in %.0f s; cancelled", STOP_TIMEOUT)


class ThreadRelay:
    """The relay on a thread running an event loop of its own (`RELAY_MODE=thread`)."""

    def __init__(self, settings: Settings) -> None:
        self._relay = Relay(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> RelayStats:
        return self._relay.stats

    async def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._relay.run(),),
                                        name="outbox-relay", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._relay.stop)
        await asyncio.to_thread(self._thread.join, STOP_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()


class ProcessRelay:
    """The relay as a child process the worker supervises (`RELAY_MODE=process`, the default).

    The child is `python -m app relay --supervised` with the worker's environment: it serves
    no web port (the worker's `/metrics` and `/health` report its stats, which it writes to
    its stdout as a JSON line every `REPORT_INTERVAL`), and it stops when its stdin closes,
    which happens when the worker exits by any means, SIGKILL included, so no relay outlives
    its worker. A child that exits on its own is started again, with backoff; until it
    reconnects `stats.connected` is false and the worker reports itself not ready.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stats = RelayStats()
        self._carried = RelayStats()  # the counters of the children that exited
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def stats(self) -> RelayStats:
        return self._stats

    @property
    def pid(self) -> int | None:
        """The child's PID while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._supervise())

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("relay process %d did not stop in %.0f s; killing it", proc.pid, STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _supervise(self) -> None:
        backoff = Backoff(0.5, 10.0)
        while not self._stopping:
            started = time.monotonic()
            try:
                code: int | str = await self._run_child()
            except Exception as exc:  # it could not be started (e.g. out of memory): try again
                code = f"{type(exc).__name__}: {exc}"
            if self._stopping:
                return
            # Totals carry over to the next child; what it reports is added to them.
            self._carried = dataclasses.replace(self._stats, errors=self._stats.errors + 1)
            self._stats = dataclasses.replace(self._carried, connected=False, active=False, shards=(),
                                              error=f"relay process exited with {code}",
                                              last_error=f"relay process exited with {code}",
                                              last_error_at=time.time())
            if time.monotonic() - started > 60:
                backoff.reset()  # it ran a while: a crash now is not a crash loop
            delay = backoff.next()
            log.warning("relay process exited with %s; starting it again in %.1f s", code, delay)
            await asyncio.sleep(delay)

    async def _run_child(self) -> int:
        env = {**os.environ, **self._settings.relay_child_env()}
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "relay", "--supervised", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        log.info("relay process %d started", proc.pid)
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            with contextlib.suppress(ValueError, TypeError):
                self._report(json.loads(line))
        return await proc.wait()

    def _report(self, fields: dict[str, object]) -> None:
        """The child's stats, its counters added to those of the children before it."""
        now = RelayStats(**{**fields, "shards": tuple(fields.get("shards") or ())})  # type: ignore[arg-type]  # fields of the child's own RelayStats
        base = self._carried
        self._stats = dataclasses.replace(
            now, published=base.published + now.published, batches=base.batches + now.batches,
            dead_lettered=base.dead_lettered + now.dead_lettered, errors=base.errors + now.errors,
            last_error=now.last_error or base.last_error, last_error_at=now.last_error_at or base.last_error_at)


def report_stats(relay: Relay, out: IO[str]) -> None:
    """Write the relay's stats as one JSON line (the supervised child's side of `ProcessRelay`)."""
    out.write(json.dumps(dataclasses.asdict(relay.stats)) + "\n")
    out.flush()


async def report_until_orphaned(relay: Relay) -> None:
    """In a supervised child: report stats every `REPORT_INTERVAL`, and stop the relay once
    stdin reaches its end (the worker closed it, or died)."""
    loop = asyncio.get_running_loop()
    orphaned = asyncio.Event()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(fd)
            orphaned.set()

    loop.add_reader(fd, readable)
    try:
        while not orphaned.is_set():
            try:
                report_stats(relay, sys.stdout)
            except OSError:  # BrokenPipeError: the worker is gone, and its end of the pipe with it
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(orphaned.wait(), REPORT_INTERVAL)
        log.info("relay: the worker is gone (its pipes closed); stopping")
        relay.stop()
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(fd)


def host_for(settings: Settings) -> RelayHost | None:
    """The host `settings.relay_mode` asks for; None for `off` (relays run as their own processes)."""
    hosts: dict[str, type[LoopRelay] | type[ThreadRelay] | type[ProcessRelay]] = {
        "process": ProcessRelay, "thread": ThreadRelay, "loop": LoopRelay}
    host = hosts.get(settings.relay_mode)
    return host(settings) if host is not None else None
