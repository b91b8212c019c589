"""Operator commands: startup failures are one clear line and a non-zero exit."""
from __future__ import annotations

import subprocess
import sys

from app.embedded.process import free_port
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


def test_every_command_has_help() -> None:
    for args in (["--help"], ["dev", "--help"], ["worker", "--help"], ["relay", "--help"],
                 ["outbox", "status", "--help"], ["demo", "--help"], ["init-db", "--help"],
                 ["schemas", "check", "--help"], ["dlq", "list", "--help"], ["dlq", "redrive", "--help"],
                 ["topic", "consumers", "--help"], ["topic", "archive", "--help"], ["replay", "--help"], ["asyncapi", "--help"]):
        done = run_app(*args)
        assert done.returncode == 0 and "usage:" in done.stdout, args
