"""Prints the reliability table of this session's fault tests at the end of the run."""
from __future__ import annotations

import pytest

from chaos.checker import Report

ROWS: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ROWS:
        terminalreporter.write_sep("-", "reliability (tests/chaos)")
        terminalreporter.write_line(Report.HEADER)
        for row in ROWS:
            terminalreporter.write_line(row)
