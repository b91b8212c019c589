"""`MODELS` names the modules that define the models; `load_models` imports them (app/registry.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.registry import ModelsNotFound, load_models
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_models_is_a_comma_separated_list_of_modules_defaulting_to_the_demo() -> None:
    assert Settings.from_env({}).models == ("models",)
    assert Settings.from_env({"MODELS": " catalog.models, billing.models ,"}).models == ("catalog.models",
                                                                                        "billing.models")


def test_load_models_imports_the_named_modules_from_any_package(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acme_catalog").mkdir()
    (tmp_path / "acme_catalog" / "__init__.py").write_text("")
    (tmp_path / "acme_catalog" / "models.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [module] = load_models(Settings(models=("acme_catalog.models",)))
    assert module.LOADED is True


def test_a_module_that_does_not_exist_is_one_error_naming_the_setting() -> None:
    with pytest.raises(ModelsNotFound, match=r"MODELS names 'acme_nowhere.models'"):
        load_models(Settings(models=("acme_nowhere.models",)))


def test_a_module_whose_own_import_fails_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acme_broken.py").write_text("import acme_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="acme_missing_dependency"):
        load_models(Settings(models=("acme_broken",)))


def test_a_command_with_a_wrong_models_setting_says_so_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "app", "schemas", "check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "MODELS": "acme_nowhere"})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: MODELS names 'acme_nowhere', which cannot be imported (No module named 'acme_nowhere'): set "
        "MODELS to the modules that define your EventedBase models, comma-separated"]
