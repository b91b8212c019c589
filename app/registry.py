"""Which modules hold a service's models: the `MODELS` setting, imported in one place.

A model registers itself on `EventedBase` when its module is imported. The library never
imports a models package by name: every entry point (the worker, each `python -m app`
command) calls `load_models(settings)`, so a company's models can live in their services'
own packages (`MODELS=catalog.models,billing.models`). The demo's are `models` (the default).
A `schemas/` folder in the package of a module it names joins the schema search path
(`app.wire.schemas`), so the entities' `.avsc` files can live beside their models.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from app.errors import EventsError
from app.settings import Settings
from app.wire.schemas import SCHEMA_DIR, add_schema_dir


class ModelsNotFound(EventsError, ValueError):
    """A module `MODELS` names cannot be imported."""


def load_models(settings: Settings) -> list[ModuleType]:
    """Import every module `settings.models` names (idempotent: Python imports a module once)."""
    loaded = []
    for name in settings.models:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # the module exists; something it imports does not: its own traceback says what
            raise ModelsNotFound(f"MODELS names {name!r}, which cannot be imported ({exc}): set MODELS to the "
                                 "modules that define your EventedBase models, comma-separated") from None
        loaded.append(module)
        schemas = Path(module.__file__ or "").parent / "schemas"
        if module.__file__ and schemas.is_dir() and schemas.resolve() != SCHEMA_DIR.resolve():
            add_schema_dir(schemas.resolve())
    return loaded
