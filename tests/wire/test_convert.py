"""Version conversion as pure functions: no servers."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from agents.downconvert import convert_batch
from agents.entity_pass import decode_all
from app.outbox.relay import to_messages
from app.wire.convert import CONVERTERS, ConversionError, Converter, chain, convert_record
from app.wire.messages import Incoming, decode, downconvert, encode_message
from app.wire.schemas import dlq_topic, load
from models.order import orders_v2_to_v1

T0 = datetime(2026, 11, 27, 6, 0, 0, 123456, tzinfo=timezone.utc)


def v2_record(**data: object) -> dict[str, object]:
    state: dict[str, object] = {"id": 5, "customer_id": 9, "amount_cents": 1999, "currency": "EUR",
                                "status": "paid", "created_at": T0, "updated_at": T0, "shipping": None}
    state.update(data)
    return {"event_id": "6f1c2d4e-1111-4a2b-9c3d-2e4f5a6b7c8d", "message_version": 1, "schema_version": 2,
            "service": "orders", "entity": "orders", "key": "5", "op": "update", "occurred_at": T0,
            "sequence": 3, "data": state}


def test_orders_v2_to_v1_converts_amount_status_and_shipping() -> None:
    shipped = {"address": "1 Quay St", "carrier": "DHL", "tracking_number": None}
    assert orders_v2_to_v1({"amount_cents": 1999, "status": "shipped", "shipping": shipped}) == {
        "amount": 19.99, "status": "shipped", "shipping_address": "1 Quay St"}
    assert orders_v2_to_v1({"amount_cents": 5, "status": "PAID", "shipping": None}) == {
        "amount": 0.05, "status": "paid", "shipping_address": None}


def test_converter_rejects_amounts_a_v1_double_cannot_hold() -> None:
    with pytest.raises(ConversionError, match="cannot be represented exactly"):
        orders_v2_to_v1({"amount_cents": 2**60, "status": "paid", "shipping": None})


def test_convert_record_keeps_envelope_and_drops_currency() -> None:
    v1 = convert_record(v2_record(), 1)
    assert {k: v1[k] for k in ("event_id", "key", "sequence", "op", "service", "occurred_at")} == {
        "event_id": "6f1c2d4e-1111-4a2b-9c3d-2e4f5a6b7c8d", "key": "5", "sequence": 3, "op": "update",
        "service": "orders", "occurred_at": T0}
    assert v1["schema_version"] == 1
    assert v1["data"] == {"id": 5, "customer_id": 9, "amount": 19.99, "status": "paid",
                          "created_at": T0, "updated_at": T0, "shipping_address": None}


def test_delete_converts_to_null_data() -> None:
    assert convert_record({**v2_record(), "op": "delete", "data": None}, 1)["data"] is None


def test_chains_compose_one_version_at_a_time() -> None:
    fake = dict(CONVERTERS)
    fake[("orders", 3, 2)] = Converter("orders", 3, 2, frozenset(), lambda d: d)
    assert [(c.source, c.target) for c in chain("orders", 3, 1, fake)] == [(3, 2), (2, 1)]
    with pytest.raises(ConversionError, match="no converter for orders v4 -> v3"):
        chain("orders", 4, 1, fake)


def test_dual_publish_and_downconvert_give_identical_bytes_and_headers() -> None:
    record = v2_record(shipping={"address": "9 Elm", "carrier": "UPS", "tracking_number": "Z1"})
    v2 = load("orders", 2)
    value, _ = encode_message(v2, record)
    # The relay's row holds data as JSON: timestamps as epoch microseconds, not datetimes.
    row = {**record, "topic": "orders-v2",
           "data": {**record["data"], "created_at": 1795759200123456, "updated_at": 1795759200123456}}  # type: ignore[dict-item]
    [own, dual] = to_messages(row, (1,))
    assert own.value == value
    converted_value, converted_headers = downconvert(value, v2, 1)
    assert (dual.topic, dual.value, dual.headers) == ("orders-v1", converted_value, converted_headers)
    assert dict(dual.headers)["ce_dataschema"] == b"urn:microservice-events:schemas:orders:v1"
    assert decode(load("orders", 1), dual.value)["data"]["shipping_address"] == "9 Elm"


def test_convert_batch_dead_letters_poison_and_keeps_going() -> None:
    v2 = load("orders", 2)
    good, _ = encode_message(v2, v2_record())
    unknown_version, _ = encode_message(v2, {**v2_record(), "schema_version": 3})
    too_big, _ = encode_message(v2, v2_record(amount_cents=2**60))
    batch = [
        Incoming(b"5", good, 2, 10, []),
        Incoming(b"x", b"\x00\xffnot avro", 2, 11, [("h", b"1")]),
        Incoming(b"5", good[: len(good) // 2], 2, 12, []),
        Incoming(b"5", unknown_version, 2, 13, []),
        Incoming(b"5", too_big, 2, 14, []),
        Incoming(b"5", None, 2, 15, []),
        Incoming(b"5", good, 2, 16, []),
    ]
    out = convert_batch(v2, [1], batch, decode_all(v2, [m.value for m in batch]))
    assert [m.topic for m in out] == ["orders-v1"] + [dlq_topic("orders-v2")] * 5 + ["orders-v1"]
    assert all(m.partition == 2 for m in out if m.topic == "orders-v1")
    letters = [dict(m.headers) for m in out if m.topic.endswith(".dlq")]
    assert [h["dlq_source_offset"] for h in letters] == [b"11", b"12", b"13", b"14", b"15"]
    assert all(h["dlq_source_topic"] == b"orders-v2" and h["dlq_source_partition"] == b"2" for h in letters)
    assert b"schema_version 3" in letters[2]["dlq_error_message"]
    assert letters[3]["dlq_error_class"] == b"ConversionError"
    assert letters[0]["h"] == b"1"  # the original headers ride along
    assert out[1].value == b"\x00\xffnot avro"  # the original bytes, untouched
