"""Test helpers for child processes started by tests (and stopped by PID)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def app_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child `python -m app ...` pointed at the test's servers."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "KAFKA_BROKER")}
    env.update(DATABASE_URL=settings.database_url, KAFKA_BROKER=settings.kafka_broker,
               SERVICE_NAME=settings.service_name, PYTHONPATH=str(ROOT), **extra)
    return env


def spawn_app(settings: Settings, *args: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """Start `python -m app <args>` with output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT,
                                env=app_env(settings, **extra), stdout=out, stderr=subprocess.STDOUT)


def stop(child: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a child by PID and reap it."""
    if child.poll() is None:
        child.send_signal(sig)
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
