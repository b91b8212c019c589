"""One error family: every error the library raises on purpose is an EventsError, transient or not."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from aiokafka.errors import AuthenticationFailedError, KafkaConnectionError

import app
from app.capture.plans import SchemaMismatch
from app.errors import EventsError, StartupError, is_transient


def own_exception_classes() -> list[type[BaseException]]:
    """Every Exception subclass defined in a module of `app/` (importing each module)."""
    found = []
    for info in pkgutil.walk_packages(app.__path__, "app."):
        if info.name in ("app.main", "app.__main__", "app.embedded.__main__"):
            continue  # the worker's app is built at import; the CLIs run at import
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, Exception):
                found.append(cls)
    return found


def test_every_error_class_of_the_library_is_an_events_error() -> None:
    classes = own_exception_classes()
    assert len(classes) >= 10
    assert [c.__qualname__ for c in classes if not issubclass(c, EventsError)] == []


def test_transient_is_on_the_type_and_reaches_through_causes() -> None:
    assert is_transient(StartupError("PostgreSQL at 127.0.0.1:1 is unreachable"))
    assert not is_transient(SchemaMismatch("orders", "amount_cents", 2, "not an integer"))
    assert is_transient(ConnectionRefusedError()) and not is_transient(KeyError("x"))
    assert is_transient(KafkaConnectionError()) and not is_transient(AuthenticationFailedError())
    try:
        try:
            raise OSError("connection reset")
        except OSError as cause:
            raise RuntimeError("commit failed") from cause
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
