"""`python -m app schemas check`: every schema folder (app/wire/compat.py), then the models
against the same files (app/capture/agreement.py); one line per problem."""
from __future__ import annotations

import sys
from pathlib import Path

from app.capture.agreement import disagreements
from app.capture.model import EventedBase
from app.wire.compat import Report, check_dir
from app.wire.schemas import schema_dirs


def run_check(schema_dir: Path | None = None) -> int:
    """The `schemas check` command: print the report; 0 when all is well, 1 otherwise.

    Without `schema_dir`, every folder of the search path (the project's `schemas/`, then those
    of the models' packages) is checked.
    """
    directories = schema_dirs() if schema_dir is None else [schema_dir]
    missing = [d for d in directories if not d.is_dir()]
    if missing:
        print(f"error: schema directory {missing[0]} does not exist", file=sys.stderr)
        return 1
    report = Report()
    for directory in directories:
        found = check_dir(directory)
        report.ok += found.ok
        report.problems += found.problems
    where = str(directories[0]) if len(directories) == 1 else ", ".join(map(str, directories))
    # The models against the same files: a column the schema lacks would be dropped from
    # every event.
    models = disagreements(EventedBase, schema_dir)
    report.problems += models
    if not models:
        report.ok.append("models: every column is in its schema or kept out of events on purpose")
    for line in report.ok:
        print(line)
    for line in report.problems:
        print(line, file=sys.stderr)
    if report.problems:
        print(f"schemas check: {len(report.problems)} problem(s) in {where}", file=sys.stderr)
        return 1
    return 0
