"""Manual smoke test, `python -m app.embedded`: all three servers until Ctrl-C, with their URLs."""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from app.embedded.broker import EmbeddedBroker
from app.embedded.postgres import EmbeddedPostgres
from app.embedded.redis import EmbeddedRedis


def main() -> None:
    """Start PostgreSQL, Redis and the broker in a temp dir until Ctrl-C, then remove the dir."""
    base = Path(tempfile.mkdtemp(prefix="embedded-"))
    t0 = time.monotonic()
    with (
        EmbeddedPostgres.start(base / "pg") as pg,
        EmbeddedRedis.start(base / "redis") as redis,
        EmbeddedBroker.start(base / "kafka") as kafka,
    ):
        print(f"started in {time.monotonic() - t0:.2f}s", file=sys.stderr)
        for server in (pg, redis, kafka):
            print(server, server.url)
        print("Ctrl-C to stop", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    main()
