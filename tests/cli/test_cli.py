"""Operator commands: startup failures are one clear line and a non-zero exit."""
from __future__ import annotations

import subprocess
import sys

from app.embedded.process import free_port
from app.settings import Settings
from tests.processes import ROOT


def run_app(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_unreachable_database_is_one_line_naming_it() -> None:
    port = free_port()
    done = run_app("relay", DATABASE_URL=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x",
                   KAFKA_BROKER="kafka://127.0.0.1:1")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "PostgreSQL" in lines[0] and f"127.0.0.1:{port}/x" in lines[0]


def test_unreachable_broker_is_one_line_naming_it(settings) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    done = run_app("worker", DATABASE_URL=settings.database_url, KAFKA_BROKER=f"kafka://127.0.0.1:{port}")
    assert done.returncode == 2
    # One line in all: aiokafka's own connection errors are not printed before ours.
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Kafka broker" in lines[0] and f"127.0.0.1:{port}" in lines[0]


def test_missing_database_url_names_the_variable() -> None:
    done = run_app("outbox", "status")
    assert done.returncode == 2 and "DATABASE_URL" in done.stderr


def test_an_unknown_relay_mode_is_one_line_naming_the_modes() -> None:
    done = run_app("relay", RELAY_MODE="sidecar", DATABASE_URL="postgresql://x/y", KAFKA_BROKER="kafka://127.0.0.1:1")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: RELAY_MODE='sidecar'"), done.stderr
    assert all(mode in lines[0] for mode in ("process", "thread", "loop", "off"))


def test_the_worker_runs_its_relay_as_a_child_unless_told_otherwise() -> None:
    assert Settings.from_env({}).relay_mode == "process"
    assert Settings.from_env({"RELAY_IN_WORKER": "0"}).relay_mode == "off"  # the older spelling
    assert Settings.from_env({"RELAY_IN_WORKER": "0", "RELAY_MODE": "thread"}).relay_mode == "thread"
    assert not Settings.from_env({"RELAY_MODE": "off"}).relay_in_worker


def test_every_command_has_help() -> None:
    for args in (["--help"], ["dev", "--help"], ["worker", "--help"], ["relay", "--help"],
                 ["outbox", "status", "--help"], ["init-db", "--help"],
                 ["schemas", "check", "--help"], ["dlq", "list", "--help"], ["dlq", "redrive", "--help"],
                 ["topic", "consumers", "--help"], ["topic", "archive", "--help"], ["replay", "--help"],
                 ["asyncapi", "--help"]):
        done = run_app(*args)
        assert done.returncode == 0 and "usage:" in done.stdout, args
