"""The shared process handling of the embedded servers: launch, wait until serving, stop by PID, pause.

Each server is a plain child process that we own: it listens on 127.0.0.1 only, on a free port,
and is stopped by its PID (``stop()`` = graceful signal, then SIGKILL after a timeout).
A server class says only how to run and probe its server (`_command`, `_probe`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self

from app.embedded.exit_guard import track
from app.embedded.pid_state import listens_on, wait_stopped
from app.errors import EventsError

__all__ = [
    "LOCALHOST",
    "POLL_INTERVAL",
    "STOP_TIMEOUT",
    "EmbeddedServerError",
    "ServerProcess",
    "clean_env",
    "free_port",
    "wait_for_port",
]

LOCALHOST = "127.0.0.1"

# How long stop() waits after the graceful signal before escalating to SIGKILL.
STOP_TIMEOUT = 10.0

# Polling interval while waiting for a server; short because all three start in well under a second.
POLL_INTERVAL = 0.02


class EmbeddedServerError(EventsError, RuntimeError):
    """Raised when an embedded server fails to start; the message carries the tail of its log."""


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on `host` that is free right now (the OS picks it)."""
    # There is an unavoidable race between closing this socket and the server binding the port;
    # in practice the kernel does not hand the same ephemeral port out again that quickly.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    *,
    name: str = "server",
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until `host:port` accepts TCP connections; raise TimeoutError naming `name` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        # Fail fast if the process we are waiting for has already died (bad flag, port taken, ...).
        if proc is not None and proc.poll() is not None:
            raise EmbeddedServerError(
                f"{name} (pid {proc.pid}) exited with code {proc.returncode} before listening on {host}:{port}"
            )
        try:
            with socket.create_connection((host, port), timeout=max(POLL_INTERVAL, 0.5)):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{name} did not accept connections on {host}:{port} within {timeout:.1f}s")
        time.sleep(POLL_INTERVAL)


def clean_env() -> dict[str, str]:
    """Return the current environment without variables that would redirect the child servers."""
    # PG* variables (PGDATA, PGPORT, PGHOST, ...) and tansu's LISTENER_URL & co. would silently
    # override or confuse what we pass on the command line.
    overriding = {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k not in overriding}
    # Stable English, byte-wise locale: predictable log messages and no dependency on installed locales.
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    # tansu colours its log with ANSI escapes even when writing to a file.
    env["NO_COLOR"] = "1"
    return env


def _tail(path: Path | None, lines: int = 30) -> str:
    """Return the last `lines` lines of a log file, or a note if there is none."""
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(log is empty)"


class ServerProcess:
    """Base class: one child process listening on 127.0.0.1:port, stoppable by PID."""

    name: ClassVar[str] = "server"
    # Signal that asks the server to shut down cleanly; PostgreSQL overrides it.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, port: int, log_path: Path, start_timeout: float) -> None:
        """Store the configuration; the process is launched by the `start` classmethods."""
        self.host: str = LOCALHOST
        self.port: int = port
        self.log_path: Path = log_path
        self.start_timeout: float = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- public --------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """PID of the server process (the last one launched, even after it has stopped)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive (a paused process counts as alive)."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully with `stop_signal`, SIGKILL after `timeout` seconds; idempotent."""
        if self._proc is not None:
            stop_child(self._proc, self.stop_signal, timeout, before_kill=self._before_sigkill)
        self._after_exit()

    def kill(self) -> None:
        """SIGKILL the server process (simulates a crash) and reap it; idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._before_sigkill()
            proc.kill()
            proc.wait()
        self._after_exit()

    def restart(self) -> Self:
        """Stop the server (if running) and start it again on the same port."""
        self.stop()
        self._start()
        return self

    def pause(self) -> None:
        """Freeze the server with SIGSTOP (connections stay open, nothing is answered); waits until frozen."""
        proc = self._require_running()
        proc.send_signal(signal.SIGSTOP)
        # kill() returns before every thread of a multi-threaded server has actually stopped;
        # wait, so that a chaos test's next step really runs against a frozen server.
        wait_stopped(proc.pid, stopped=True)

    def resume(self) -> None:
        """Unfreeze a server paused with `pause()` (SIGCONT); waits until it runs again."""
        proc = self._require_running()
        proc.send_signal(signal.SIGCONT)
        wait_stopped(proc.pid, stopped=False)

    def __enter__(self) -> Self:
        """Return the already-started server."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def __repr__(self) -> str:
        """Show address, pid and state for debugging."""
        pid = self._proc.pid if self._proc is not None else None
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} pid={pid} {state}>"

    # -- subclass hooks ------------------------------------------------------------------------

    def _command(self) -> list[str]:
        """Return the argv that runs the server in the foreground."""
        raise NotImplementedError

    def _probe(self) -> bool:
        """Return True once the server answers a real request (polled until the start deadline)."""
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for subprocess.Popen (e.g. the user to run as)."""
        return {}

    def _before_sigkill(self) -> None:
        """Called right before the process is SIGKILLed."""

    def _after_exit(self) -> None:
        """Release per-run resources once the process is gone; must be idempotent."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        track(self, False)

    # -- internals -----------------------------------------------------------------------------

    def _require_running(self) -> subprocess.Popen[bytes]:
        """Return the live process or raise."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        return self._proc

    def _start(self) -> None:
        """Launch the process and wait until it serves requests; on failure kill it and raise."""
        deadline = time.monotonic() + self.start_timeout
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append, so that the log of a run before restart() is kept for post-mortems.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _after_exit
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            # Own session: a Ctrl-C aimed at the test runner must not take the servers down
            # behind our back; we control their lifecycle through stop()/kill().
            start_new_session=True,
            **self._popen_kwargs(),
        )
        track(self, True)
        try:
            # Ownership first: a probe alone could be answered by another server already on this
            # port while ours is dying with "address in use" (tansu even exits 0 in that case).
            where = f"{self.host}:{self.port}"
            self._poll_until(deadline, self._owns_listener, f"{self.name} did not listen on {where}")
            self._poll_until(deadline, self._probe, f"{self.name} did not answer requests on {where}")
        except BaseException as err:
            self.kill()
            if isinstance(err, (EmbeddedServerError, TimeoutError)):
                raise EmbeddedServerError(
                    f"{self.name} failed to start on {self.host}:{self.port}: {err}\n"
                    f"--- last lines of {self.log_path} ---\n{_tail(self.log_path)}"
                ) from err
            raise

    def _owns_listener(self) -> bool:
        """True if our process has a listening TCP socket on host:port."""
        return listens_on(self._require_started().pid, self.host, self.port)

    def _poll_until(self, deadline: float, check: Callable[[], bool], what: str) -> None:
        """Call `check` until it returns True, the process dies, or `deadline` passes."""
        while True:
            proc = self._require_started()
            if proc.poll() is not None:
                raise EmbeddedServerError(f"{self.name} (pid {proc.pid}) exited with code {proc.returncode}")
            if check():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} within {self.start_timeout:.1f}s")
            time.sleep(POLL_INTERVAL)

    def _require_started(self) -> subprocess.Popen[bytes]:
        """Return the process handle, which must exist."""
        assert self._proc is not None
        return self._proc


def stop_child(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT,
               before_kill: Callable[[], None] | None = None) -> None:
    """Stop `proc` with `sig`, SIGKILL after `timeout` seconds; it is reaped when this returns."""
    if proc.poll() is not None:
        return
    # send_signal() is a no-op once the child has been reaped, so no PID-reuse hazard.
    proc.send_signal(sig)
    # A SIGSTOPped (paused) process only acts on the stop signal once it is continued.
    proc.send_signal(signal.SIGCONT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if before_kill is not None:
            before_kill()
        proc.kill()
        proc.wait()
