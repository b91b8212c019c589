"""Prints the reliability table of this session's fault tests at the end of the run.

Each fault test appends its row to `test-artifacts/chaos-report.md`; under `pytest -n N` the
tests run in other processes, so the table is the rows appended since this session started.
"""
from __future__ import annotations

import pytest

from chaos.checker import Report
from tests.processes import ROOT

REPORT = ROOT / "test-artifacts" / "chaos-report.md"
_start: dict[str, int] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    _start["size"] = REPORT.stat().st_size if REPORT.exists() else 0


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT.exists():
        return
    with REPORT.open() as table:
        table.seek(_start.get("size", 0))
        rows = [line.rstrip("\n") for line in table if line.strip() and line.rstrip("\n") != Report.HEADER]
    if rows:
        terminalreporter.write_sep("-", "reliability (tests/chaos)")
        terminalreporter.write_line(Report.HEADER)
        for row in rows:
            terminalreporter.write_line(row)
