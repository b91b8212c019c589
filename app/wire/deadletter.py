"""Dead letters: what a stage cannot use goes to a dead-letter topic, with why and where from in headers.

One format for every stage. Every dead letter starts with the headers `reason` writes:
`dlq_error_class`, `dlq_error_message`, `dlq_source_topic`, then where it came from:
`dlq_source_partition` and `dlq_source_offset` for a message an agent consumed, or
`dlq_outbox_id` for an outbox row the relay could not encode or publish. An agent's letter is
the consumed message, untouched (key, value, its own headers after ours), on
`<source topic>.dlq` (an inbox consumer's on `<source topic>.<consumer>.dlq`). The relay's is
the outbox row as JSON (`content-type: application/json`) on `outbox.dlq`, its
`dlq_source_topic` the topic the row was meant for: its event never reached a topic, so the
row is what can be published again. `python -m app dlq list|redrive` read both
(app/cli/dlq.py). Agents produce their output (dead letters included) before their input is
acked (agents/batching.py `produce_all`), and the relay deletes a row only once its
letter is acked, so a crash sends a letter twice at worst and never loses one.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from app.wire.messages import Headers, Incoming, Outgoing
from app.wire.schemas import dlq_topic

log = logging.getLogger(__name__)

#: Every header a dead letter adds starts with this; redrive drops them.
PREFIX = "dlq_"
ERROR_CLASS = "dlq_error_class"
ERROR_MESSAGE = "dlq_error_message"
SOURCE_TOPIC = "dlq_source_topic"
SOURCE_PARTITION = "dlq_source_partition"
SOURCE_OFFSET = "dlq_source_offset"
OUTBOX_ID = "dlq_outbox_id"
#: On a message redrive sent: `<dlq topic>:<partition>:<offset>` of its dead letter.
REDRIVEN_FROM = "dlq_redriven_from"
#: Outbox columns JSON has no type for, written as text (`outbox_row` reads them back).
_ROW_AS_TEXT = ("event_id", "occurred_at")


def reason(exc: BaseException, source_topic: str, *, partition: int | None = None,
           offset: int | None = None, outbox_id: int | None = None) -> Headers:
    """Why it failed and where it came from: the headers every dead letter starts with."""
    where = ((SOURCE_PARTITION, partition), (SOURCE_OFFSET, offset), (OUTBOX_ID, outbox_id))
    return [
        (ERROR_CLASS, type(exc).__name__.encode()),
        (ERROR_MESSAGE, str(exc)[:1000].encode(errors="replace")),
        (SOURCE_TOPIC, source_topic.encode()),
        *((name, str(value).encode()) for name, value in where if value is not None),
    ]


def dead_letter(source_topic: str, msg: Incoming, exc: BaseException, *, to: str | None = None) -> Outgoing:
    """The original message, untouched, with why it failed and where it came from in headers,
    on `to` (default `<source topic>.dlq`; an inbox consumer has its own)."""
    headers = reason(exc, source_topic, partition=msg.partition, offset=msg.offset)
    return Outgoing(to or dlq_topic(source_topic), msg.key, msg.value, None, headers + list(msg.headers))


def outbox_dead_letter(topic: str, row: Mapping[str, Any], exc: BaseException) -> Outgoing:
    """An outbox row the relay cannot publish, as JSON on `topic`, with why in the same headers."""
    body = {k: (str(v) if k in _ROW_AS_TEXT else v) for k, v in dict(row).items()}
    headers = reason(exc, str(row["topic"]), outbox_id=row["id"]) + [("content-type", b"application/json")]
    return Outgoing(topic, str(row["key"]).encode(), json.dumps(body).encode(), None, headers)


def outbox_row(value: bytes) -> dict[str, Any]:
    """The outbox row of an `outbox_dead_letter`, with the types the relay read it with."""
    row: dict[str, Any] = json.loads(value)
    row["occurred_at"] = datetime.fromisoformat(row["occurred_at"])
    return row
