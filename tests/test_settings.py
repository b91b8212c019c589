"""Settings: one typed object, its defaults written once, read from the environment."""
from __future__ import annotations

import dataclasses

import pytest

from app.settings import ENV, Settings


def test_an_empty_environment_gives_the_defaults_written_in_the_class() -> None:
    assert Settings.from_env({}) == Settings()


def test_every_variable_sets_a_field_of_its_type() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert set(ENV.values()) <= fields
    got = Settings.from_env({"WEB_PORT": "7001", "PRODUCER_LINGER_MS": "3.5", "MODELS": "a, b,",
                             "RECOVERY_CONSISTENCY_CHECK": "false", "DATABASE_URL_BILLING": "postgresql://b"})
    assert (got.web_port, got.producer_linger_ms, got.models) == (7001, 3.5, ("a", "b"))
    assert got.recovery_consistency_check is False
    assert got.service_database_urls == (("billing", "postgresql://b"),)


@pytest.mark.parametrize(("var", "value", "says"), [("WEB_PORT", "80a", "an integer"),
                                                    ("STUCK_AFTER_S", "soon", "a number")])
def test_a_value_that_does_not_parse_is_refused_naming_its_variable(var: str, value: str, says: str) -> None:
    with pytest.raises(ValueError, match=f"^{var}='{value}' is not {says}"):
        Settings.from_env({var: value})
