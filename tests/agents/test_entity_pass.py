"""One pass over an entity's topic: each value decoded once, every job handed the same records."""
from __future__ import annotations

from typing import Any

from agents.downconvert import Downconvert
from agents.entity_pass import decode_all
from app.wire.messages import encode_message
from app.wire.schemas import dlq_topic, load
from tests.wire.test_convert import v2_record


class FakeMessage:
    def __init__(self, key: bytes, value: bytes | None, offset: int) -> None:
        self.key, self.value, self.partition, self.offset, self.headers = key, value, 1, offset, []


class FakeEvent:
    def __init__(self, message: FakeMessage) -> None:
        self.message = message


def test_decode_all_marks_tombstones_and_garbage_as_poison_and_keeps_every_decodable_record() -> None:
    v2 = load("orders", 2)
    good, _ = encode_message(v2, v2_record())
    other_version, _ = encode_message(v2, {**v2_record(), "schema_version": 3})
    records = decode_all(v2, [good, None, b"\x00\xffnot avro", other_version])
    assert isinstance(records[0], dict) and records[0]["key"] == v2_record()["key"]
    assert isinstance(records[1], ValueError) and "tombstone" in str(records[1])
    assert isinstance(records[2], Exception)
    # Decodable but of another version: the views count it (as the chaos checker does), only
    # down-conversion refuses it.
    assert isinstance(records[3], dict) and records[3]["schema_version"] == 3


def test_the_downconvert_job_converts_decoded_records_and_counts_once_produced() -> None:
    v2 = load("orders", 2)
    good, _ = encode_message(v2, v2_record())
    other_version, _ = encode_message(v2, {**v2_record(), "schema_version": 3})
    counted: list[tuple[str, int, int]] = []
    job = Downconvert(v2, [1], lambda topic, ok, dead: counted.append((topic, ok, dead)))
    values = [good, b"junk", other_version, good]
    events: list[Any] = [FakeEvent(FakeMessage(b"5", v, i)) for i, v in enumerate(values)]
    out = job.run(events, decode_all(v2, values))
    assert [m.topic for m in out] == ["orders-v1", dlq_topic("orders-v2"), dlq_topic("orders-v2"), "orders-v1"]
    assert b"schema_version 3" in dict(out[2].headers)["dlq_error_message"]
    assert counted == []  # nothing counted before the broker took it
    job.sent(out)
    assert counted == [("orders-v2", 2, 2)]
