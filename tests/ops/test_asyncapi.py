"""The AsyncAPI document: valid against the official 3.0.0 JSON Schema, and true to the code."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import jsonschema
import pytest
from referencing import Registry

from app.ops.asyncapi import AVRO_SCHEMA_FORMAT, build_document
from app.settings import Settings
from app.topology import RELAY_DLQ_TOPIC, current_version, evented_topics, legacy_modes
from app.wire.messages import ce_headers, schema_for_topic
from app.wire.schemas import SCHEMA_DIR, field_type, topic_name

ROOT = Path(__file__).resolve().parents[2]
SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "asyncapi" / "3.0.0.json"

Document = dict[str, Any]


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The vendored official AsyncAPI 3.0.0 JSON Schema."""
    return json.loads(SPEC.read_text())


@pytest.fixture(scope="module")
def validator(spec: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator of the draft the schema declares, that refuses to fetch any remote `$ref`."""
    cls = jsonschema.validators.validator_for(spec)
    cls.check_schema(spec)

    def no_remote(uri: str) -> Any:
        raise LookupError(f"the vendored schema must be self-contained; it refers to {uri}")

    return cls(spec, registry=Registry(retrieve=no_remote))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def document() -> Document:
    """The document for the default settings, as JSON would carry it."""
    return json.loads(json.dumps(build_document(Settings())))


def refs(node: Any, skip: str = "examples") -> Iterator[str]:
    """Every string `$ref` under `node`, outside `skip` keys (examples are not schema)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key != skip:
                yield from refs(value, skip)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value, skip)


def resolve(document: Document, ref: str) -> Any:
    """The node a local `#/a/b` reference points at (JSON Pointer, with ~0/~1 escapes)."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def errors(validator: jsonschema.protocols.Validator, document: Document) -> list[str]:
    """Validation errors, one line each with where they are."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(document)]


def test_vendored_schema_is_the_self_contained_draft_07_one(spec: dict[str, Any]) -> None:
    assert spec["$schema"].startswith("http://json-schema.org/draft-07/schema")
    assert spec["properties"]["asyncapi"]["const"] == "3.0.0"
    for ref in refs(spec):
        assert ref.startswith("#/"), f"remote $ref {ref}"
        resolve(spec, ref)


def test_document_is_valid_asyncapi_3_0_0(validator: jsonschema.protocols.Validator, document: Document) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert errors(validator, document) == []


def test_the_validator_rejects_broken_documents(validator: jsonschema.protocols.Validator,
                                                document: Document) -> None:
    # Proof that the validation above is not vacuous, down to the Avro schema inside a payload.
    broken_avro = copy.deepcopy(document)
    broken_avro["channels"]["orders-v2"]["messages"]["event"]["payload"]["schema"] = {"type": "recordd"}
    no_action = copy.deepcopy(document)
    del no_action["operations"]["send-orders-v2"]["action"]
    stray = copy.deepcopy(document)
    stray["channels"]["orders-v1"]["topic"] = "orders-v1"
    for broken in (broken_avro, no_action, stray):
        assert errors(validator, broken)


def test_info_server_and_content_type(document: Document) -> None:
    assert document["info"]["title"] == "microservice-events"
    assert document["info"]["version"]
    assert document["defaultContentType"] == "application/avro"
    server = document["servers"]["kafka"]
    assert (server["protocol"], server["host"]) == ("kafka", "localhost:9092")
    configured = build_document(Settings(kafka_broker="kafka://kafka:9092"))
    assert configured["servers"]["kafka"]["host"] == "kafka:9092"


def test_every_topic_the_system_uses_is_a_channel(document: Document) -> None:
    addresses = [c["address"] for c in document["channels"].values()]
    assert len(addresses) == len(set(addresses))
    assert set(addresses) == {*evented_topics(), RELAY_DLQ_TOPIC}
    assert {"orders-v2", "orders-v1", "customers-v1", "access-v1", "orders-v2.dlq", "outbox.dlq"} <= set(addresses)


def test_messages_carry_the_avsc_files_as_they_are(document: Document) -> None:
    checked = set()
    for channel in document["channels"].values():
        for message in channel["messages"].values():
            payload = message["payload"]
            if channel["address"] == RELAY_DLQ_TOPIC:
                assert message["contentType"] == "application/json" and "schemaFormat" not in payload
                continue
            schema = schema_for_topic(channel["address"].removesuffix(".dlq"))
            assert payload["schemaFormat"] == AVRO_SCHEMA_FORMAT
            assert schema.path == SCHEMA_DIR / schema.entity / f"v{schema.version}.avsc"
            assert payload["schema"] == json.loads(schema.path.read_text())
            assert message["bindings"]["kafka"]["key"]["type"] == "string"
            checked.add(channel["address"])
    assert "orders-v1" in checked and "access-v1" in checked


def header_values(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    """Kafka headers as the JSON object the message's header schema describes."""
    return {name: value.decode() for name, value in headers}


def check_headers(message: dict[str, Any], headers: list[tuple[str, bytes]]) -> None:
    """Real headers validate against the message's header schema, formats included."""
    jsonschema.validate(header_values(headers), message["headers"], format_checker=jsonschema.FormatChecker())


def test_event_headers_are_what_the_relay_writes(document: Document) -> None:
    now = datetime.now(timezone.utc)
    for topic in evented_topics():
        if topic.endswith(".dlq"):
            continue
        message = document["channels"][topic]["messages"]["event"]
        schema = schema_for_topic(topic)
        written = ce_headers(schema, uuid4(), "orders", field_type(schema.raw, "op")["symbols"][0], now)
        assert message["headers"]["required"] == [name for name, _ in written]
        check_headers(message, written)
        wrong = [(n, b"other.create.v9" if n == "ce_type" else v) for n, v in written]
        with pytest.raises(jsonschema.ValidationError):
            check_headers(message, wrong)


def test_dead_letter_headers_are_what_the_agent_writes(document: Document) -> None:
    from app.wire.deadletter import dead_letter
    from app.wire.messages import Incoming

    source = schema_for_topic("orders-v2")
    original = ce_headers(source, uuid4(), "orders", "update", datetime.now(timezone.utc))
    letter = dead_letter(source.topic, Incoming(b"7", b"\x00", 3, 42, original), ValueError("bad"))
    message = document["channels"][letter.topic]["messages"]["deadLetter"]
    assert message["headers"]["required"] == [n for n, _ in letter.headers if n.startswith("dlq_")]
    check_headers(message, letter.headers)


def test_outbox_dead_letter_is_what_the_relay_writes(document: Document) -> None:
    from app.outbox.relay import dead_letter

    row = {"id": 9, "topic": "orders-v2", "entity": "orders", "schema_version": 2, "key": "7",
           "event_id": uuid4(), "op": "update", "service": "orders", "occurred_at": datetime.now(timezone.utc),
           "sequence": 3, "data": {"id": 7}}
    letter = dead_letter(row, ValueError("cannot encode"))  # type: ignore[arg-type]
    message = document["channels"][letter.topic]["messages"]["deadLetter"]
    assert message["headers"]["required"] == [n for n, _ in letter.headers]
    check_headers(message, letter.headers)
    jsonschema.validate(json.loads(letter.value), message["payload"], format_checker=jsonschema.FormatChecker())


def test_operations_send_everything_and_receive_the_current_versions(document: Document) -> None:
    operations = document["operations"]
    def addresses(action: str) -> set[str]:
        return {resolve(document, op["channel"]["$ref"])["address"]
                for op in operations.values() if op["action"] == action}

    sent, received = addresses("send"), addresses("receive")
    assert sent == {c["address"] for c in document["channels"].values()}
    assert received == {topic_name(entity, current_version(entity)) for entity in legacy_modes()}
    for op in operations.values():
        channel_ref = op["channel"]["$ref"]
        for message in op["messages"]:
            # An operation's messages must be messages of its own channel.
            assert message["$ref"].startswith(channel_ref + "/messages/")
            resolve(document, message["$ref"])
    for ref in refs(document):
        resolve(document, ref)


def test_legacy_descriptions_follow_the_mode(document: Document) -> None:
    assert "own-converted" in document["channels"]["orders-v1"]["description"]
    assert "process_orders" in document["operations"]["send-orders-v1"]["description"]
    switched = build_document(Settings(legacy_modes="orders:1=dual-publish"))
    assert "ual-published" in switched["channels"]["orders-v1"]["description"]
    assert "relay" in switched["operations"]["send-orders-v1"]["description"]
    # Nothing down-converts: the cache agent dead-letters what it cannot decode instead.
    assert "refresh_cache_orders" in switched["operations"]["send-orders-v2.dlq"]["description"]
    assert "refresh_cache_customers" in document["operations"]["send-customers-v1.dlq"]["description"]
    assert "down-conversion" in document["operations"]["receive-orders-v2"]["description"]
    assert "down-conversion" not in switched["operations"]["receive-orders-v2"]["description"]


def test_cli_prints_the_document_and_writes_it(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    expected = json.loads(json.dumps(build_document(Settings.from_env(env))))
    printed = subprocess.run([sys.executable, "-m", "app", "asyncapi"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == expected
    assert printed.stdout.startswith('{\n  "asyncapi": "3.0.0"')  # pretty, not one line
    out = tmp_path / "asyncapi.json"
    written = subprocess.run([sys.executable, "-m", "app", "asyncapi", "--out", str(out)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert json.loads(out.read_text()) == expected
