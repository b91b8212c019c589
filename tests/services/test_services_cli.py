"""`python -m services`: the demo's own entry point, outside the library's `python -m app`."""
from __future__ import annotations

import subprocess
import sys

from tests.processes import ROOT


def run_services(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "services", *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_every_demo_service_has_help() -> None:
    for args in (["--help"], ["demo", "--help"], ["billing", "--help"]):
        done = run_services(*args)
        assert done.returncode == 0 and "usage: python -m services" in done.stdout, args


def test_the_library_no_longer_answers_for_the_demo() -> None:
    done = subprocess.run([sys.executable, "-m", "app", "billing"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == 2 and "invalid choice: 'billing'" in done.stderr


def test_a_missing_database_url_is_one_line_naming_it() -> None:
    done = run_services("billing")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: DATABASE_URL is not set (or use `python -m app dev`, which starts embedded servers)"]


def test_a_setting_that_does_not_parse_is_one_line_naming_it() -> None:
    done = run_services("demo", "--count", "1", DATABASE_URL="postgresql+asyncpg://x@127.0.0.1:1/x",
                        RELAY_MODE="sideways")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "RELAY_MODE" in lines[0], lines
