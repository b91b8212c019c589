"""Run faults under load on a stack of their own, then check the promises and report.

`python -m chaos` (`make chaos`) is the soak: every fault in turn, for `--rounds` rounds, on one
stack whose history keeps growing, each under continuous load, each followed by a check of
everything written so far. The tests in `tests/chaos/` run one fault each on a fresh stack.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from app.capture.roles import WORKER
from chaos.checker import Checker, Report
from chaos.faults import Fault, faults
from chaos.load import Load
from chaos.metrics import count_over
from chaos.stack import Process, Stack

log = logging.getLogger(__name__)


class Session:
    """A stack, its checker, and the running total of what the load generator did."""

    def __init__(self, stack: Stack, checker: Checker) -> None:
        self.stack = stack
        self.checker = checker
        self.totals = Report("all")
        self._exits_noted = 0  # of stack.self_exits, already in a report

    @classmethod
    async def start(cls, root: Path) -> Session:
        stack = await Stack.start(root)
        try:
            checker = await Checker(stack.postgres.dsn, stack.settings.bootstrap_servers,
                                    stack.settings.redis_url).start()
        except BaseException:
            stack.stop()
            raise
        return cls(stack, checker)

    async def stop(self) -> None:
        await self.checker.stop()
        self.stack.stop()

    async def run(self, fault: Fault, *, rate: float = 100.0, warmup: float = 3.0, tail: float = 2.0,
                  converge_timeout: float = 120.0, seed: int = 1) -> Report:
        """Start workers up to `fault.workers` (and billing, if a fault left it dead), write at
        `rate` while the fault acts, then converge."""
        while len(self.stack.alive_workers) < fault.workers:
            dead = [w for w in self.stack.workers if not w.alive]
            if dead:
                await dead[0].start()
            else:
                await self.stack.add_worker()
        if self.stack.billing is not None and not self.stack.billing.alive:
            await self.stack.billing.start(60)
        load = Load(self.stack.settings, rate=rate, seed=seed)
        writing = asyncio.get_running_loop().create_task(load.run())
        try:
            await asyncio.sleep(warmup)  # the fault strikes a system under load
            notes = await fault.act(self.stack)
            await asyncio.sleep(tail)
        finally:
            load.stop()
            stats = await writing
        for field in ("committed", "ambiguous", "retried", "rolled_back"):
            name = "writes" if field == "committed" else field
            setattr(self.totals, name, getattr(self.totals, name) + getattr(stats, field))
        # A fault that commits writes of its own (a backlog) counts them with the load's.
        self.totals.writes += notes.get("_committed writes", 0)
        report = Report(fault.name, notes=notes)
        # The database holds this stack's whole history: check all of it, against all writes.
        report.writes, report.ambiguous = self.totals.writes, self.totals.ambiguous
        report.retried, report.rolled_back = stats.retried, stats.rolled_back
        await self.checker.converge(report, self.view_url(), timeout=converge_timeout)
        if not report.consistent:  # what each consumer was doing when it did not converge
            report.notes["_consumer state"] = await self.capture_consumer_state()
        if report.consistent:  # then what readers get through the cache must agree too
            worker_url = self.stack.settings.database_url_for(WORKER)
            report.cache_mismatches += await self.checker.read_through_mismatches(worker_url)
        report.notes["workers alive"] = len(self.stack.alive_workers)
        await self.note_workers(report)
        return report

    async def note_workers(self, report: Report) -> None:
        """Add what the workers did by themselves since the last report: exits (each restarted by
        the stack), and the commits the live ones made past a message they had not finished."""
        exits = self.stack.self_exits[self._exits_noted:]
        self._exits_noted = len(self.stack.self_exits)
        running = [e for e in exits if not e.while_starting]  # say on a stall it could not heal
        if running:
            report.notes["self-restarts"] = f"{len(running)} ({'; '.join(map(str, running))})"
        if len(running) < len(exits):  # refused to start (say PostgreSQL was down): started again
            report.notes["failed starts"] = len(exits) - len(running)
        commits = await count_over(w.url for w in self.stack.alive_workers)
        report.commits_past_unacked = commits.total
        report.notes["_commits past unacked exported by"] = commits.exported_by
        if commits.unanswered:
            report.notes["/metrics unanswered"] = commits.unanswered

    async def capture_consumer_state(self) -> list[str]:
        """Write each alive worker's `GET /debug/consumer` to `<root>/consumer-state-<name>-<n>.json`
        (an error it met instead); the paths written."""
        async def capture(worker: Process, session: aiohttp.ClientSession) -> str:
            n = 1
            while (path := self.stack.root / f"consumer-state-{worker.name}-{n}.json").exists():
                n += 1
            try:
                async with session.get(worker.url + "/debug/consumer") as response:
                    body = await response.text()
                    if response.status != 200:
                        body = json.dumps({"error": f"HTTP {response.status}", "body": body})
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                body = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
            path.write_text(body)
            # And every task's stack, into its log (mode's Worker handles SIGUSR1).
            if worker.proc is not None and worker.alive:
                worker.proc.send_signal(signal.SIGUSR1)
            return str(path)

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            return list(await asyncio.gather(*(capture(w, session) for w in self.stack.alive_workers)))

    def view_url(self) -> str:
        alive = self.stack.alive_workers
        if not alive:
            raise RuntimeError("no worker is alive to answer view lookups")
        return alive[0].url


async def soak(root: Path, names: Sequence[str], rounds: int, rate: float, catalogue: dict[str, Fault],
               converge_timeout: float) -> list[Report]:
    session = await Session.start(root)
    reports = []
    try:
        for round_no in range(rounds):
            for name in names:
                started = time.monotonic()
                report = await session.run(catalogue[name], rate=rate, seed=round_no * 100 + len(reports),
                                           converge_timeout=converge_timeout)
                reports.append(report)
                print(f"{report.row()}  [{time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
    finally:
        await session.stop()
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--faults", default="all", help="comma-separated fault names, or 'all': "
                        + ", ".join(faults()))
    parser.add_argument("--rounds", type=int, default=2, help="times through the fault list (default 2)")
    parser.add_argument("--rate", type=float, default=200.0, help="writes/s in all (default 200)")
    parser.add_argument("--kills", type=int, default=5, help="worker kills per worker-kill fault")
    parser.add_argument("--billing-kills", type=int, default=4, help="billing kills per billing-kill fault")
    parser.add_argument("--broker-pause", type=float, default=20.0, help="seconds the broker is paused")
    parser.add_argument("--worker-pause", type=float, default=30.0, help="seconds the worker is paused")
    parser.add_argument("--poison", type=int, default=1000, help="poison messages per input topic")
    parser.add_argument("--converge-timeout", type=float, default=300.0)
    parser.add_argument("--dir", default=None, help="where servers and logs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    catalogue = faults(kills=args.kills, broker_pause=args.broker_pause, poison_count=args.poison,
                       worker_pause=args.worker_pause, billing_kills=args.billing_kills)
    names = list(catalogue) if args.faults == "all" else args.faults.split(",")
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(catalogue)}")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="chaos-"))
    reports = asyncio.run(soak(root, names, args.rounds, args.rate, catalogue, args.converge_timeout))
    print(Report.HEADER)
    for report in reports:
        print(report.row())
    failed = [r for r in reports if not r.ok]
    print(f"\n{len(reports) - len(failed)}/{len(reports)} faults kept every promise; logs in {root}")
    return 1 if failed else 0
