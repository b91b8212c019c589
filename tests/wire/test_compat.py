"""`schemas check`: pure checks of Avro schema resolution and of the converter registry (no servers)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from app.wire.compat import check_dir, resolution_problems
from app.wire.convert import CONVERTERS, Converter
from app.wire.schemas import SCHEMA_DIR

ROOT = Path(__file__).resolve().parents[2]
BROKEN = Path(__file__).resolve().parents[1] / "fixtures" / "broken_schemas"


def record(name: str, *fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


def enum(*symbols: str, **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": "Status", "symbols": list(symbols), **extra}


def problems(reader: Any, writer: Any) -> list[str]:
    return resolution_problems(reader, writer, "v1", "v2")


def test_the_real_schemas_pass() -> None:
    report = check_dir(SCHEMA_DIR)
    assert report.problems == []
    assert any(line.startswith("orders v2 -> v1: ok") and "orders_v2_to_v1" in line for line in report.ok)


def test_the_broken_fixture_fails_naming_entity_versions_and_field() -> None:
    report = check_dir(BROKEN, converters={})
    assert report.problems == ["orders v2 -> v1: field data.customer_id: missing in v2 and has no default"]


def test_the_command_exits_0_on_the_real_schemas_and_1_on_the_fixture() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", "schemas", "check", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    good = run()
    assert good.returncode == 0, good.stderr
    assert "orders v2 -> v1: ok" in good.stdout
    bad = run("--dir", str(BROKEN))
    assert bad.returncode == 1
    assert "orders v2 -> v1: field data.customer_id: missing in v2 and has no default" in bad.stderr


def test_promotion_is_compatible_and_demotion_is_not() -> None:
    for writer, reader in [("int", "long"), ("int", "double"), ("long", "float"), ("float", "double"),
                           ("string", "bytes"), ("bytes", "string")]:
        assert problems(record("R", {"name": "x", "type": reader}),
                        record("R", {"name": "x", "type": writer})) == [], (writer, reader)
    assert problems(record("R", {"name": "x", "type": "int"}), record("R", {"name": "x", "type": "long"})) == [
        "field x: v2 type long cannot be read as v1 type int"]


def test_logical_types_compare_on_their_underlying_type() -> None:
    micros = {"type": "long", "logicalType": "timestamp-micros"}
    assert problems(record("R", {"name": "t", "type": "long"}), record("R", {"name": "t", "type": micros})) == []


def test_a_removed_field_fails_unless_the_reader_has_a_default() -> None:
    writer = record("R", {"name": "a", "type": "long"})
    reader = record("R", {"name": "a", "type": "long"}, {"name": "gone", "type": "string"})
    assert problems(reader, writer) == ["field gone: missing in v2 and has no default"]
    reader_with_default = record("R", {"name": "a", "type": "long"}, {"name": "gone", "type": "string", "default": ""})
    assert problems(reader_with_default, writer) == []


def test_an_added_field_is_ignored_and_a_renamed_one_resolves_by_alias() -> None:
    writer = record("R", {"name": "a", "type": "long"}, {"name": "added", "type": "string", "default": "x"})
    assert problems(record("R", {"name": "a", "type": "long"}), writer) == []
    renamed = record("R", {"name": "old_a", "type": "long", "aliases": ["a"]})
    assert problems(renamed, writer) == []


def test_a_removed_enum_symbol_fails_unless_the_reader_enum_has_a_default() -> None:
    writer = record("R", {"name": "s", "type": enum("paid", "shipped", "refunded")})
    assert problems(record("R", {"name": "s", "type": enum("paid", "shipped")}), writer) == [
        "field s: enum symbol(s) 'refunded' of v2 missing in v1 (and the v1 enum has no default)"]
    assert problems(record("R", {"name": "s", "type": enum("paid", "shipped", default="paid")}), writer) == []
    assert problems(record("R", {"name": "s", "type": enum("paid", "shipped", "refunded", "new")}), writer) == []


def test_unions_nested_records_and_named_references() -> None:
    inner_v2 = record("Inner", {"name": "n", "type": "int"})
    inner_v1 = record("Inner", {"name": "n", "type": "long"}, {"name": "m", "type": "string"})
    writer = record("R", {"name": "a", "type": ["null", inner_v2]}, {"name": "b", "type": "Inner"})
    reader = record("R", {"name": "a", "type": ["null", inner_v1]}, {"name": "b", "type": "Inner"})
    assert problems(reader, writer) == ["field a.m: missing in v2 and has no default",
                                        "field b.m: missing in v2 and has no default"]
    # A writer union needs every branch readable; a reader union needs one matching branch.
    assert problems(record("R", {"name": "x", "type": "string"}),
                    record("R", {"name": "x", "type": ["null", "string"]})) == [
        "field x: v2 type null cannot be read as v1 type string"]
    assert problems(record("R", {"name": "x", "type": ["null", "long"]}),
                    record("R", {"name": "x", "type": "int"})) == []
    assert problems(record("R", {"name": "xs", "type": {"type": "array", "items": "int"}}),
                    record("R", {"name": "xs", "type": {"type": "array", "items": "string"}})) == [
        "field xs[]: v2 type string cannot be read as v1 type int"]


def test_a_converter_covers_the_fields_it_sets_and_nothing_else(tmp_path: Path) -> None:
    # The real orders v2 -> v1 needs the converter: plain resolution fails on the changed fields.
    plain = check_dir(SCHEMA_DIR, converters={})
    assert "orders v2 -> v1: field data.amount: missing in v2 and has no default" in plain.problems
    # A converter that forgets a changed field leaves it to resolution, which names it.
    partial = {("orders", 2, 1): Converter("orders", 2, 1, frozenset({"amount", "shipping_address"}),
                                           CONVERTERS[("orders", 2, 1)].step)}
    assert check_dir(SCHEMA_DIR, converters=partial).problems == [
        "orders v2 -> v1: field data.status: v2 type enum OrderStatus cannot be read as v1 type string"]


def test_an_unparsable_schema_is_reported(tmp_path: Path) -> None:
    (tmp_path / "things").mkdir()
    (tmp_path / "things" / "v1.avsc").write_text('{"type": "record", "name": "T", "fields": [{"name": "x"}]}')
    report = check_dir(tmp_path)
    assert len(report.problems) == 1 and report.problems[0].startswith("things/v1.avsc: does not parse")
