"""`python -m app schemas check`: every schema parses and every older version can be served.

For each entity and each pair of versions newer N -> older M, either a converter chain
(`app.wire.convert.CONVERTERS`) takes N down to M — then every data field of each step's target
that the step does not produce must resolve from the same-named field of its source, and the
envelope must resolve as a whole — or, without a converter chain, the whole M schema must be
able to read N data by Avro schema resolution (reader = older, writer = newer).

The resolution rules are the Avro specification's, written out as small pure functions over
`fastavro.parse_schema` output (fastavro has no compatibility checker of its own). A problem
is one string naming the field path, e.g. `field data.amount: missing in v2 and has no default`.

Over 300 lines on purpose: the Avro resolution rules are one recursive check, each rule a few
lines, and they are read together against the specification.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro

from app.wire.convert import CONVERTERS, ConversionError, Converter, chain

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "enum", "fixed"})
#: writer type -> the reader types it may be read as (Avro "promotion").
PROMOTIONS: Mapping[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
FILE_NAME = re.compile(r"^v(\d+)\.avsc$")


# --------------------------------------------------------------------------------------------
# Avro schema resolution (reader vs writer), pure
# --------------------------------------------------------------------------------------------

@dataclass
class Resolution:
    """Named types of both sides, labels for messages, and record pairs already being checked."""

    reader_named: Mapping[str, Any]
    writer_named: Mapping[str, Any]
    reader_label: str = "reader"
    writer_label: str = "writer"
    seen: set[tuple[str, str]] = field(default_factory=set)

    def reader(self, avro_type: Any) -> Any:
        return underlying(avro_type, self.reader_named)

    def writer(self, avro_type: Any) -> Any:
        return underlying(avro_type, self.writer_named)


def underlying(avro_type: Any, named: Mapping[str, Any]) -> Any:
    """The type itself: named references looked up, `{"type": "long", "logicalType": ...}` -> "long"."""
    if isinstance(avro_type, str):
        return avro_type if avro_type in PRIMITIVES else named[avro_type]
    if isinstance(avro_type, dict) and avro_type.get("type") in PRIMITIVES:
        return avro_type["type"]  # logical types compare on their underlying type
    return avro_type


def kind(avro_type: Any) -> str:
    """"union", "record", "enum", "fixed", "array", "map" or the primitive's name."""
    if isinstance(avro_type, list):
        return "union"
    return avro_type if isinstance(avro_type, str) else avro_type["type"]


def short_name(name: str) -> str:
    """The unqualified name (`events.orders.v2.Order` -> `Order`)."""
    return name.rsplit(".", 1)[-1]


def describe(avro_type: Any) -> str:
    """A short human name of a (dereferenced) type."""
    k = kind(avro_type)
    if k == "union":
        return "[" + ", ".join(describe(t) if not isinstance(t, str) else short_name(t) for t in avro_type) + "]"
    if k in NAMED:
        return f"{k} {short_name(avro_type['name'])}"
    return k


def names_match(reader: dict[str, Any], writer: dict[str, Any]) -> bool:
    """Named types match by unqualified name, or by one of the reader's aliases."""
    wanted = short_name(writer["name"])
    return wanted == short_name(reader["name"]) or wanted in {short_name(a) for a in reader.get("aliases", ())}


def matches(reader: Any, writer: Any) -> bool:
    """The spec's shallow "match" (both dereferenced, neither a union), used to pick union branches."""
    rk, wk = kind(reader), kind(writer)
    if rk == wk:
        return names_match(reader, writer) if rk in NAMED else True
    return rk in PROMOTIONS.get(wk, ())


def where(path: str) -> str:
    return f"field {path}" if path else "the event record"


def resolve(reader: Any, writer: Any, path: str, ctx: Resolution) -> list[str]:
    """Why data written with `writer` cannot be read with `reader`; `[]` when it can."""
    reader, writer = ctx.reader(reader), ctx.writer(writer)
    if kind(writer) == "union":  # any writer branch may be the one on the wire
        return [p for branch in writer for p in resolve(reader, branch, path, ctx)]
    if kind(reader) == "union":
        for branch in reader:
            if matches(ctx.reader(branch), writer):
                return resolve(branch, writer, path, ctx)
        return [(f"{where(path)}: {ctx.writer_label} type {describe(writer)} matches no branch "
                 f"of {ctx.reader_label} union {describe(reader)}")]
    if not matches(reader, writer):
        return [(f"{where(path)}: {ctx.writer_label} type {describe(writer)} cannot be read "
                 f"as {ctx.reader_label} type {describe(reader)}")]
    k = kind(reader)
    if k == "record":
        pair = (reader["name"], writer["name"])
        if pair in ctx.seen:  # recursive type: already being checked further up
            return []
        ctx.seen.add(pair)
        try:
            return record_fields_resolve(reader, writer, path, ctx)
        finally:
            ctx.seen.discard(pair)
    if k == "enum":
        return enum_resolve(reader, writer, path, ctx)
    if k == "fixed" and reader["size"] != writer["size"]:
        return [(f"{where(path)}: fixed size {writer['size']} in {ctx.writer_label}, "
                 f"{reader['size']} in {ctx.reader_label}")]
    if k == "array":
        return resolve(reader["items"], writer["items"], f"{path}[]", ctx)
    if k == "map":
        return resolve(reader["values"], writer["values"], f"{path}{{}}", ctx)
    return []


def record_fields_resolve(reader: dict[str, Any], writer: dict[str, Any], path: str, ctx: Resolution,
                          skip: frozenset[str] = frozenset()) -> list[str]:
    """Each reader field (except `skip`) comes from the writer field of its name/alias, or its default.

    Writer fields the reader does not have are ignored, as in Avro resolution.
    """
    by_name = {f["name"]: f for f in writer["fields"]}
    problems: list[str] = []
    for reader_field in reader["fields"]:
        name = reader_field["name"]
        if name in skip:
            continue
        field_path = f"{path}.{name}" if path else name
        source = next((by_name[n] for n in (name, *reader_field.get("aliases", ())) if n in by_name), None)
        if source is not None:
            problems += resolve(reader_field["type"], source["type"], field_path, ctx)
        elif "default" not in reader_field:
            problems.append(f"field {field_path}: missing in {ctx.writer_label} and has no default")
    return problems


def enum_resolve(reader: dict[str, Any], writer: dict[str, Any], path: str, ctx: Resolution) -> list[str]:
    """Every writer symbol must be a reader symbol, unless the reader enum has a default."""
    missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
    if not missing or "default" in reader:
        return []
    listed = ", ".join(repr(s) for s in missing)
    return [(f"{where(path)}: enum symbol(s) {listed} of {ctx.writer_label} missing in "
             f"{ctx.reader_label} (and the {ctx.reader_label} enum has no default)")]


def resolution_problems(reader_schema: Any, writer_schema: Any, reader_label: str = "reader",
                        writer_label: str = "writer") -> list[str]:
    """Why `reader_schema` cannot read data written with `writer_schema` (raw or parsed schemas)."""
    reader, writer = parsed(reader_schema), parsed(writer_schema)
    ctx = Resolution(reader["__named_schemas"], writer["__named_schemas"], reader_label, writer_label)
    return resolve(reader, writer, "", ctx)


def parsed(schema: Any) -> Any:
    """fastavro's parsed form of a record, every named type in `__named_schemas`.

    A schema that is not a record is wrapped in one (field `value`), so the rules see one shape.
    """
    if isinstance(schema, dict) and schema.get("__fastavro_parsed"):
        return schema
    if not (isinstance(schema, dict) and schema.get("type") == "record"):
        schema = {"type": "record", "name": "Value", "fields": [{"name": "value", "type": schema}]}
    return fastavro.parse_schema(schema)


# --------------------------------------------------------------------------------------------
# Version pairs: converter chain or plain resolution
# --------------------------------------------------------------------------------------------

def data_record(schema: Any) -> Any:
    """The (dereferenced) record type of the top-level `data` field, or None."""
    named = schema["__named_schemas"]
    for f in schema["fields"]:
        if f["name"] == "data":
            t = underlying(f["type"], named)
            branches = t if isinstance(t, list) else [t]
            records = [underlying(b, named) for b in branches if kind(underlying(b, named)) == "record"]
            return records[0] if len(records) == 1 else None
    return None


def converter_step_problems(step: Converter, source: Any, target: Any) -> list[str]:
    """One converter step: envelope resolves; every target data field it does not set resolves."""
    ctx = Resolution(target["__named_schemas"], source["__named_schemas"], f"v{step.target}", f"v{step.source}")
    problems = record_fields_resolve(target, source, "", ctx, skip=frozenset({"data"}))
    data_field = next((f for f in target["fields"] if f["name"] == "data"), None)
    if data_field is None:
        return problems
    target_data, source_data = data_record(target), data_record(source)
    if target_data is None or source_data is None:
        return problems + [f"field data: not a record (or nullable record) in v{step.source} and v{step.target}"]
    target_names = {f["name"] for f in target_data["fields"]}
    problems += [f"field data.{name}: set by converter {step.step.__name__} but not a field of v{step.target}"
                 for name in sorted(step.produces - target_names)]
    return problems + record_fields_resolve(target_data, source_data, "data", ctx, skip=step.produces)


def pair_problems(entity: str, newer: int, older: int, schemas: Mapping[int, Any],
                  converters: Mapping[tuple[str, int, int], Converter]) -> tuple[str, list[str]]:
    """How `older` is served from `newer` (converter chain or plain resolution) and what is wrong."""
    try:
        steps = chain(entity, newer, older, dict(converters))
    except ConversionError:
        steps = None
    if steps is None:
        return f"v{older} reads v{newer} by Avro schema resolution", resolution_problems(schemas[older], schemas[newer],
                                                              f"v{older}", f"v{newer}")
    problems = []
    for step in steps:
        if step.source not in schemas or step.target not in schemas:
            problems.append(f"converter {step.step.__name__} v{step.source} -> v{step.target}: "
                            f"no schema file for one of them")
            continue
        problems += converter_step_problems(step, schemas[step.source], schemas[step.target])
    how = ", then ".join(f"converter {s.step.__name__} sets {', '.join(sorted(s.produces))}" for s in steps)
    return f"{how}; every other field resolves", problems


@dataclass
class Report:
    """Lines of a check: `ok` per good pair, `problems` each naming what is wrong."""

    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_schemas(schemas: Mapping[str, Mapping[int, Any]],
                  converters: Mapping[tuple[str, int, int], Converter] | None = None) -> Report:
    """Every pair newer -> older of every entity (parsed schemas keyed by entity and version)."""
    registry = CONVERTERS if converters is None else converters
    report = Report()
    for entity in sorted(schemas):
        versions = sorted(schemas[entity], reverse=True)
        if len(versions) == 1:
            report.ok.append(f"{entity} v{versions[0]}: only version, nothing to resolve")
        for i, newer in enumerate(versions):
            for older in versions[i + 1:]:
                how, problems = pair_problems(entity, newer, older, schemas[entity], registry)
                prefix = f"{entity} v{newer} -> v{older}"
                if problems:
                    report.problems += [f"{prefix}: {p}" for p in problems]
                else:
                    report.ok.append(f"{prefix}: ok: {how}")
    return report


def load_dir(schema_dir: Path) -> tuple[dict[str, dict[int, Any]], list[str]]:
    """Parse every `.avsc` under `schema_dir`: ({entity: {version: parsed}}, problems)."""
    schemas: dict[str, dict[int, Any]] = {}
    problems: list[str] = []
    for path in sorted(schema_dir.rglob("*.avsc")):
        rel = path.relative_to(schema_dir)
        try:
            schema = parsed(json.loads(path.read_text()))
        except Exception as exc:  # any parse failure is reported, not raised
            problems.append(f"{rel}: does not parse: {type(exc).__name__}: {exc}")
            continue
        match = FILE_NAME.match(path.name)
        if len(rel.parts) != 2 or match is None:
            problems.append(f"{rel}: not named <entity>/v<N>.avsc, so no version can be served from it")
            continue
        schemas.setdefault(rel.parts[0], {})[int(match.group(1))] = schema
    return schemas, problems


def check_dir(schema_dir: Path, converters: Mapping[tuple[str, int, int], Converter] | None = None) -> Report:
    """Parse and check a schema directory (default converters: `app.wire.convert.CONVERTERS`)."""
    schemas, parse_problems = load_dir(schema_dir)
    report = check_schemas(schemas, converters)
    report.problems = parse_problems + report.problems
    return report
