"""The fault suite's settings: what `tests/chaos` runs once per fault, and `make soak` many times."""
from __future__ import annotations

from chaos.checker import Report
from chaos.faults import Fault, faults
from chaos.run import Session

#: Fewer writes than `make chaos`: the suite has to stay within minutes on 2 cores.
RATE = 60.0
WARMUP = 2.0
TAIL = 1.0
CONVERGE_TIMEOUT = 90.0
#: Faults promised a shorter convergence (a rolling restart: 60 s after the last restart).
CONVERGE_TIMEOUTS = {"rolling-restart": 60.0}


def suite_faults() -> dict[str, Fault]:
    """Every fault at the suite's settings.

    Restarted workers are killed again 6 s after they start if not ready by then (start-up
    and recovery are crashed into too); `make chaos` waits for ready every time.
    """
    return faults(kills=5, broker_pause=20, poison_count=1000, worker_pause=20, ready_within=6, billing_kills=4)


FAULTS = suite_faults()


async def run_fault(session: Session, name: str, *, seed: int = 1) -> Report:
    """Run fault `name` under load on `session`'s stack, at the suite's settings."""
    return await session.run(FAULTS[name], rate=RATE, warmup=WARMUP, tail=TAIL,
                             converge_timeout=CONVERGE_TIMEOUTS.get(name, CONVERGE_TIMEOUT), seed=seed)
