"""The README's command lines: each parses with the real parser, the read-only ones run for real."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import build_parser
from app.kafka import ensure_topics
from app.settings import Settings
from tests.processes import ROOT, app_env

README = (ROOT / "README.md").read_text()
#: The full tables the README links to: their command lines must stay true as well.
DOCS = "".join(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))


def app_lines(text: str = README) -> list[str]:
    """The arguments of every `python -m app ...` in `text` (code blocks and inline code)."""
    found = []
    for match in re.finditer(r"(?:^|`)python -m app ([^`\n#]*)", text, re.M):
        args = match.group(1).strip()
        if "<" not in args:  # `python -m app <command> --help` style placeholders
            found.append(args)
    return found


def test_the_readme_shows_every_command() -> None:
    commands = {line.split()[0] for line in app_lines()}
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert commands == set(subparsers.choices), set(subparsers.choices) ^ commands  # type: ignore[arg-type]


@pytest.mark.parametrize("args", app_lines() + app_lines(DOCS))
def test_each_readme_command_line_parses(args: str) -> None:
    build_parser().parse_args(shlex.split(args))  # SystemExit (usage error) fails the test


#: Lines that read (or only create what is missing) and return: run against this session's servers.
READ_ONLY = ("outbox status", "schemas check", "dlq list orders-v2.dlq", "topic consumers orders-v1",
             "asyncapi --out asyncapi.json", "init-db", "snapshot --dry-run",
             "topic list")


async def test_the_read_only_readme_commands_run(settings: Settings, schema: None, tmp_path: Path) -> None:
    lines = app_lines()
    await ensure_topics(settings, ["orders-v1", "orders-v2.dlq"])
    for args in READ_ONLY:
        assert args in lines, f"{args!r} is no longer in the README"
        done = subprocess.run([sys.executable, "-m", "app", *shlex.split(args)], cwd=tmp_path,
                              env=app_env(settings), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    assert (tmp_path / "asyncapi.json").stat().st_size > 1000


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    named = set(re.findall(r"(?:^|`)make ([a-z]+)", README, re.M))
    assert named and named <= targets, named - targets
