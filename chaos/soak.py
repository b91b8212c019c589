"""`python -m chaos.soak` (`make soak`): the faults that once lost an event or stalled a worker,
each run many times on a fresh stack at the suite's settings, summed up in one table.

A loss or a stall shows in about one run in five at best (issue 27), so a single pass of the
suite proves little; this is the evidence a fix needs. Not part of `make test`: 20 runs of
each fault take over an hour on 2 cores. `--burn` keeps one core busy meanwhile, which widens
the race windows (the loss reproduced that way). Each run keeps its logs in a directory of
its own, printed when the run fails; the table goes to `test-artifacts/soak-<date>.md` too.
Exits 1 if any run lost an event, stalled, or broke another promise.
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chaos.checker import Report
from chaos.run import Session
from chaos.stack import ROOT, SelfExit
from chaos.suite import CONVERGE_TIMEOUT, CONVERGE_TIMEOUTS, FAULTS, run_fault

DEFAULT_FAULTS = ("storm", "worker-takeover")
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class Outcome:
    """One run of one fault on a fresh stack."""

    fault: str
    number: int
    logs: Path
    seconds: float = 0.0
    report: Report | None = None
    error: str | None = None  # what raised instead of a report (a worker never ready, say)
    self_exits: list[SelfExit] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.report.lost if self.report is not None else 0

    @property
    def stalled(self) -> bool:
        """It never converged, or a running worker exited by itself (a stall it could not heal)."""
        never = self.report is not None and self.report.converge_s is None
        return never or any(not e.while_starting for e in self.self_exits)

    @property
    def failed(self) -> bool:
        return self.error is not None or self.report is None or not self.report.ok or self.stalled

    def summary(self) -> str:
        """What happened, in a line; with the logs' directory if the run failed."""
        head = f"{'FAILED' if self.failed else 'ok'} in {self.seconds:.0f} s"
        if self.error is not None:
            return f"{head}; {self.error}; logs {self.logs}"
        assert self.report is not None
        converge = self.report.converge_s
        converged = "never converged" if converge is None else f"converged in {converge:.1f} s"
        exits = "; ".join(map(str, self.self_exits)) or "none"
        text = f"{head}; {converged}, lost {self.lost}, self-exits: {exits}"
        return f"{text}; logs {self.logs}" if self.failed else text


async def run_once(fault: str, number: int, logs: Path) -> Outcome:
    """Fault `fault` under load on a fresh stack in `logs`, stopped after."""
    outcome = Outcome(fault, number, logs)
    started = time.monotonic()
    try:
        session = await Session.start(logs)
        try:
            outcome.report = await run_fault(session, fault, seed=number)
        finally:
            outcome.self_exits = list(session.stack.self_exits)
            await session.stop()
    except Exception as exc:  # the run failed; the soak goes on with the next one
        outcome.error = f"{type(exc).__name__}: {exc}"
        (logs / "soak-error.txt").write_text(traceback.format_exc())
    outcome.seconds = time.monotonic() - started
    return outcome


def table(outcomes: Sequence[Outcome], faults: Sequence[str]) -> str:
    """One row per fault: runs, events lost, stalls, slowest convergence, failures."""
    rows = ["| fault | runs | events lost | stalls | max time to converge | failures |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in faults:
        mine = [o for o in outcomes if o.fault == name]
        times = [o.report.converge_s for o in mine if o.report is not None and o.report.converge_s is not None]
        slowest = f"{max(times):.1f} s" if times else "–"
        rows.append(f"| {FAULTS[name].name} | {len(mine)} | {sum(o.lost for o in mine)} "
                    f"| {sum(o.stalled for o in mine)} | {slowest} | {sum(o.failed for o in mine)} |")
    return "\n".join(rows)


def details(outcomes: Sequence[Outcome]) -> list[str]:
    """A paragraph per failed run: what broke, and where its logs are."""
    out = []
    for o in outcomes:
        if o.failed:
            out.append(f"- {o.fault} run {o.number}: {o.summary()}")
            if o.report is not None:
                out += [f"  - {o.report.row()}"] + [f"  - {e}" for e in o.report.examples[:5]]
    return out


def write_artifact(text: str) -> Path:
    """Append `text` to today's `test-artifacts/soak-<date>.md`."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"soak-{time.strftime('%Y-%m-%d')}.md"
    with path.open("a") as out:
        out.write(text + "\n")
    return path


async def soak(faults: Sequence[str], runs: int, root: Path) -> list[Outcome]:
    """`runs` rounds of every fault in `faults`, one after the other, each on a fresh stack."""
    outcomes = []
    for number in range(1, runs + 1):
        for name in faults:
            outcome = await run_once(name, number, root / f"{name}-{number:02d}")
            outcomes.append(outcome)
            print(f"{name} {number}/{runs}: {outcome.summary()}", flush=True)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                        help=f"comma-separated, from: {', '.join(FAULTS)} (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="runs of each fault (default 20)")
    parser.add_argument("--burn", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--dir", default=None, help="where each run's stack and logs go (default: a temporary "
                        "directory)")
    args = parser.parse_args(argv)
    names = [n for n in args.faults.split(",") if n]
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="soak-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    timeouts = ", ".join(f"{n} {CONVERGE_TIMEOUTS.get(n, CONVERGE_TIMEOUT):.0f} s" for n in names)
    print(f"soak: {args.runs} runs of {', '.join(names)}{' with a core burning' if args.burn else ''}; "
          f"converge timeout {timeouts}; logs in {root}", flush=True)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.burn else None
    try:
        outcomes = asyncio.run(soak(names, args.runs, root))
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    summary = table(outcomes, names)
    print("\n" + summary)
    failed = details(outcomes)
    path = write_artifact("\n".join([
        f"## Soak of {started} (`python -m chaos.soak {' '.join(argv if argv is not None else sys.argv[1:])}`)",
        "", f"{args.runs} runs of each fault, each on a fresh stack{', one core burning' if args.burn else ''}; "
        f"logs in `{root}`.", "", summary, "", *(["Failed runs:", "", *failed, ""] if failed else [])]))
    print(f"\n{sum(not o.failed for o in outcomes)}/{len(outcomes)} runs kept every promise; table in {path}")
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
