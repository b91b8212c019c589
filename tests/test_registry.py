"""`MODELS` names the modules that define the models; `load_models` imports them (app/registry.py)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from app.registry import ModelsNotFound, load_models
from app.settings import Settings
from app.wire import schemas as wire_schemas

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


def test_a_models_package_may_carry_its_own_schemas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire_schemas, "EXTRA_DIRS", [])  # this test's search path only
    entity = f"widgets{uuid.uuid4().hex[:8]}"
    package = tmp_path / "acme_widgets"
    (package / "schemas" / entity).mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("")
    shutil.copy(wire_schemas.SCHEMA_DIR / "invoices" / "v1.avsc", package / "schemas" / entity / "v1.avsc")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LookupError, match=f"no schema for {entity} v1"):
        wire_schemas.load(entity, 1)
    load_models(Settings(models=("acme_widgets.models",)))
    assert wire_schemas.schema_dirs() == [wire_schemas.SCHEMA_DIR, (package / "schemas").resolve()]
    assert wire_schemas.load(entity, 1).path == (package / "schemas" / entity / "v1.avsc").resolve()
    assert wire_schemas.versions(entity) == [1]


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
