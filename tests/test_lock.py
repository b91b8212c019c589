"""requirements.lock: what `make`, CI and the Dockerfile install, and what this suite runs on."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def locked() -> dict[str, str]:
    """name -> exact version, from requirements.lock."""
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not version.endswith(" "), f"not an exact pin: {line!r}"
        out[canonicalize_name(name)] = version
    return out


def test_the_lock_pins_every_dependency_the_project_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("embedded", "test", "lint"):
        declared += project["optional-dependencies"][extra]
    pins = locked()
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not locked"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {spec!r}"


def test_this_suite_runs_on_the_locked_versions() -> None:
    # What `make test` and CI install: a test run on other versions proves nothing about the lock.
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an optional tool of another platform or extra
        assert installed == version, f"{name} {installed} installed, {version} locked: run `make install`"


def test_make_and_the_dockerfile_install_with_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if re.search(r"pip install .*-e '", line)
                and "LOCK_VENV" not in line]
    assert installs and all("-c $(LOCK)" in line for line in installs), installs
    # A cold install takes minutes: it shows progress instead of nothing (`-q`).
    assert all(" -q " not in line and "--progress-bar on" in line for line in installs), installs
    assert re.search(r"^\$\(VENV\)/\.installed: .*\$\(LOCK\)", makefile, re.M)  # a new lock reinstalls
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml requirements.lock" in dockerfile
    assert "pip install -c requirements.lock -r requirements.txt" in dockerfile
