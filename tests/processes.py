"""Test helpers for child processes started by tests (and stopped by PID)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from app.settings import Settings
from tests.waiting import POLL

ROOT = Path(__file__).resolve().parent.parent


def app_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child `python -m app ...` pointed at the test's servers."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "KAFKA_BROKER") and not k.startswith("DATABASE_URL_")}
    env.update(DATABASE_URL=settings.database_url, KAFKA_BROKER=settings.kafka_broker,
               SERVICE_NAME=settings.service_name, PYTHONPATH=str(ROOT),
               DB_ROLE_PREFIX=settings.db_role_prefix)  # the session's own roles (tests/conftest.py)
    # Each service on its role, as `make dev` and Compose run them (DATABASE_URL_<SERVICE>).
    env.update(settings.service_database_env())
    # No relay web server unless a test asks for one on a port of its own: tests run in
    # parallel, and two relays on the default port 6067 made the second one exit at start
    # ("address already in use"): a supervised relay that published nothing in 60 s.
    env["RELAY_WEB_PORT"] = "0"
    env.update(extra)
    return env


def listening(pid: int, port: int) -> set[str]:
    """The addresses process `pid` accepts connections on at `port`, read from its sockets."""
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def spawn_app(settings: Settings, *args: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """Start `python -m app <args>` with output to `log`."""
    return _spawn("app", settings, args, log, extra)


def spawn_service(settings: Settings, *args: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """Start one of the demo's services, `python -m services <args>`, with output to `log`."""
    return _spawn("services", settings, args, log, extra)


def _spawn(module: str, settings: Settings, args: tuple[str, ...], log: Path,
           extra: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                                env=app_env(settings, **extra), stdout=out, stderr=subprocess.STDOUT)


def stop(child: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a child by PID and reap it."""
    if child.poll() is None:
        child.send_signal(sig)
        try:
            child.wait(2)  # Faust sometimes hangs in shutdown; no test needs a clean exit
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def wait_for_log(log: Path, text: str, child: subprocess.Popen[bytes] | None = None,
                       timeout: float = 60.0, start: int = 0) -> None:
    """Wait until `text` appears in `log` after byte `start`; fail early if `child` died."""
    deadline = time.monotonic() + timeout
    while True:
        content = log.read_bytes()[start:] if log.exists() else b""
        if text.encode() in content:
            return
        if child is not None and child.poll() is not None:
            raise AssertionError(f"process exited with {child.returncode} before {text!r}:\n"
                                 f"{content[-3000:].decode(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {log} after {timeout} s:\n"
                                 f"{content[-3000:].decode(errors='replace')}")
        await asyncio.sleep(POLL)


async def start_worker(settings: Settings, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """A Faust worker (`python -m app worker`), returned once it says it is ready."""
    start = log.stat().st_size if log.exists() else 0
    # Table stores go next to the log, not into the repository.
    extra.setdefault("FAUST_DATA_DIR", str(log.parent / "faust-data"))
    child = spawn_app(settings, "worker", log=log, **extra)
    await wait_for_log(log, "[^Worker]: Ready", child, start=start)
    return child


async def run_app(kafka: Settings, *args: str) -> tuple[int, str, str]:
    """`python -m app <args>` as a child process pointed at the session's broker."""
    env = {**os.environ, "KAFKA_BROKER": kafka.kafka_broker, "PYTHONPATH": str(ROOT)}
    child = await asyncio.create_subprocess_exec(sys.executable, "-m", "app", *args, cwd=ROOT, env=env,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()
