"""Stops embedded servers still running when the interpreter exits: a safety net for a forgotten stop()."""

from __future__ import annotations

import atexit
import contextlib
import threading
from typing import Protocol

__all__ = ["track"]


class _Stoppable(Protocol):
    """What the safety net needs of a server: a way to stop it."""

    def stop(self) -> None:
        """Stop the server; idempotent."""


# Servers whose process is running. A safety net only: if a dev script or a crashed test forgets
# stop(), the servers would otherwise outlive the interpreter because they run in their own session.
_RUNNING: set[_Stoppable] = set()
_RUNNING_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _stop_all_at_exit() -> None:
    """Stop every embedded server still running when the interpreter exits."""
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for server in servers:
        # Best effort during interpreter shutdown: one failure must not keep the others running.
        with contextlib.suppress(Exception):
            server.stop()


def track(server: _Stoppable, running: bool) -> None:
    """Record whether `server` currently owns a live process, for the exit safety net."""
    global _ATEXIT_REGISTERED
    with _RUNNING_LOCK:
        if running:
            _RUNNING.add(server)
            # Registered lazily so that importing this module has no side effects.
            if not _ATEXIT_REGISTERED:
                atexit.register(_stop_all_at_exit)
                _ATEXIT_REGISTERED = True
        else:
            _RUNNING.discard(server)
