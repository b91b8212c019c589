"""Models and their Avro schemas must agree before anything runs (`app/capture/agreement.py`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, mapped_column

from app.aggregations import count_by, window_count
from app.capture.agreement import ModelSchemaMismatch, check_models, disagreements, unevented_column
from app.cli.preflight import StartupError, init_db
from app.cli.relay import run_relay
from app.main import create_app
from app.orm import sensitive_column
from app.settings import Settings
from app.wire import schemas as wire_schemas

PROJECT_SCHEMAS = wire_schemas.SCHEMA_DIR


def catalog(extra: dict[str, Any] | None = None, *, with_extension: bool = False) -> type[DeclarativeBase]:
    """A base holding a `Product` model (id, name, plus `extra` columns) of entity `products` v1,
    and with `with_extension` a `ProductStock` extension (field `stock`)."""
    class Base(DeclarativeBase):
        __extends__: Any = None
        __extension_field__: Any = None

    attrs: dict[str, Any] = {"__tablename__": "products", "__entity__": "products", "__owner__": "catalog",
                             "__schema_version__": 1, "id": mapped_column(BigInteger, primary_key=True),
                             "name": mapped_column(String(100)), **(extra or {})}
    product = type("Product", (Base,), attrs)
    if with_extension:
        type("ProductStock", (Base,), {
            "__tablename__": "product_stock", "__extends__": product, "__extension_field__": "stock",
            "product_id": mapped_column(BigInteger, ForeignKey("products.id"), primary_key=True),
            "on_hand": mapped_column(BigInteger)})
    return Base


def schema(directory: Path, *fields: dict[str, Any]) -> Path:
    """Write `products/v1.avsc` under `directory` with these `data` fields; the directory."""
    (directory / "products").mkdir(parents=True, exist_ok=True)
    (directory / "products" / "v1.avsc").write_text(json.dumps({
        "type": "record", "name": "ProductEvent", "fields": [
            {"name": "id", "type": "string"},
            {"name": "data", "type": ["null", {"type": "record", "name": "Product", "fields": list(fields)}]}]}))
    return directory


ID = {"name": "id", "type": "long"}
NAME = {"name": "name", "type": "string"}


def test_models_that_match_their_schemas_pass(tmp_path: Path) -> None:
    assert disagreements(catalog(), schema(tmp_path, ID, NAME)) == []
    check_models(catalog(), schema(tmp_path, ID, NAME))  # does not raise


def test_a_column_missing_from_the_schema_is_refused_naming_model_column_and_file(tmp_path: Path) -> None:
    base = catalog({"internal_note": mapped_column(String(100))})
    with pytest.raises(ModelSchemaMismatch) as err:
        check_models(base, schema(tmp_path, ID, NAME))
    message = str(err.value)
    assert "\n" not in message
    assert "Product.internal_note" in message and f"{tmp_path.name}/products/v1.avsc" in message
    assert "unevented_column()" in message  # how to keep it out on purpose


def test_a_column_kept_out_on_purpose_passes(tmp_path: Path) -> None:
    base = catalog({"internal_note": unevented_column(String(100)),
                    "supplier_cost_cents": sensitive_column(BigInteger)})
    assert disagreements(base, schema(tmp_path, ID, NAME)) == []


def test_a_sensitive_column_in_the_schema_is_refused(tmp_path: Path) -> None:
    base = catalog({"supplier_cost_cents": sensitive_column(BigInteger)})
    [problem] = disagreements(base, schema(tmp_path, ID, NAME, {"name": "supplier_cost_cents", "type": "long"}))
    assert problem.startswith("Product.supplier_cost_cents is sensitive") and "products/v1.avsc" in problem


def test_an_unevented_column_in_the_schema_is_refused(tmp_path: Path) -> None:
    base = catalog({"internal_note": unevented_column(String(100))})
    [problem] = disagreements(base, schema(tmp_path, ID, NAME, {"name": "internal_note", "type": "string"}))
    assert "Product.internal_note is declared unevented_column()" in problem


def test_a_schema_field_with_no_column_and_no_default_is_refused(tmp_path: Path) -> None:
    [problem] = disagreements(catalog(), schema(tmp_path, ID, NAME, {"name": "colour", "type": "string"}))
    assert problem.startswith("Product: field 'colour'") and "no column in table products" in problem
    defaulted = {"name": "colour", "type": ["null", "string"], "default": None}
    assert disagreements(catalog(), schema(tmp_path, ID, NAME, defaulted)) == []


def test_an_extension_is_checked_against_its_record_and_its_key_is_implied(tmp_path: Path) -> None:
    base = catalog(with_extension=True)
    stock = {"name": "stock", "type": ["null", {"type": "record", "name": "Stock", "fields": [
        {"name": "on_hand", "type": "long"}]}], "default": None}
    assert disagreements(base, schema(tmp_path, ID, NAME, stock)) == []
    empty = {**stock, "type": ["null", {"type": "record", "name": "Stock", "fields": []}]}
    [problem] = disagreements(base, schema(tmp_path, ID, NAME, empty))
    assert problem.startswith("ProductStock.on_hand") and "the 'stock' record in" in problem
    [missing] = disagreements(base, schema(tmp_path, ID, NAME))
    assert missing.startswith("ProductStock: its extension field 'stock'")


def test_an_aggregation_naming_a_field_the_schema_lacks_is_refused(tmp_path: Path) -> None:
    base = catalog({"__aggregations__": (count_by("products_by_name", "name"), count_by("by_colour", "colour"))})
    [problem] = disagreements(base, schema(tmp_path, ID, NAME))
    assert problem == (f"Product: aggregation 'by_colour': 'colour' is not a field of the entity's schema "
                       f"(fields: id, name) in {tmp_path.name}/products/v1.avsc")


def test_an_aggregation_named_like_an_entity_or_windows_on_two_time_fields_are_refused(tmp_path: Path) -> None:
    base = catalog({"__aggregations__": (count_by("products", "name"),
                                         window_count("per_minute", time="id"),
                                         window_count("per_hour", time="made_at"))})
    problems = disagreements(base, schema(tmp_path, ID, NAME, {"name": "made_at", "type": "long", "default": 0}))
    assert any("windows must share one" in p and "['id', 'made_at']" in p for p in problems)
    assert any(p.startswith("Product: aggregation 'products' has the name of entity 'products'") for p in problems)


def test_a_model_without_a_schema_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire_schemas, "SCHEMA_DIR", tmp_path)  # the project's schemas: none for products
    [problem] = disagreements(catalog())
    assert problem.startswith("Product: ") and "products/v1.avsc does not exist" in problem
    # `schemas check --dir` on another directory checks only the entities it has.
    (tmp_path / "elsewhere" / "customers").mkdir(parents=True)
    assert disagreements(catalog(), tmp_path / "elsewhere") == []


@pytest.fixture
def dropped_currency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's schemas with `currency` removed from orders v2, as the project's schema dir."""
    copy = tmp_path / "schemas"
    shutil.copytree(PROJECT_SCHEMAS, copy)
    path = copy / "orders" / "v2.avsc"
    raw = json.loads(path.read_text())
    data = next(f for f in raw["fields"] if f["name"] == "data")
    record = next(t for t in data["type"] if isinstance(t, dict))
    record["fields"] = [f for f in record["fields"] if f["name"] != "currency"]
    path.write_text(json.dumps(raw))
    monkeypatch.setattr(wire_schemas, "SCHEMA_DIR", copy)
    return copy


async def test_init_db_refuses_a_model_its_schema_would_drop_a_column_of_before_touching_the_database(
        dropped_currency: Path) -> None:
    # No server at this URL: the refusal comes first, in one line.
    with pytest.raises(StartupError) as err:
        await init_db(Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none"))
    assert "Order.currency" in str(err.value) and "schemas/orders/v2.avsc" in str(err.value)
    assert "\n" not in str(err.value)


async def test_the_relay_and_the_worker_refuse_it_too(dropped_currency: Path) -> None:
    with pytest.raises(StartupError, match=r"Order\.currency .* schemas/orders/v2\.avsc"):
        await run_relay(Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none",
                                 kafka_broker="kafka://127.0.0.1:1"))
    with pytest.raises(ModelSchemaMismatch, match=r"Order\.currency"):
        create_app(Settings(app_id="mse-agreement-test"))
