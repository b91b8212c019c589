"""The AsyncAPI 3.0.0 document of this system's topics, generated from the models and schemas/.

One channel per topic: each root entity's current-version topic (written by the outbox relay)
and every older version it still serves (dual-published by the relay or down-converted by the
worker), `access-v1`, and the dead-letter topics. Messages carry the `.avsc` of their topic
as an Avro payload schema, the CloudEvents binary-mode headers as a JSON Schema, and a string
Kafka key. `python -m app asyncapi [--out FILE]` prints or writes it; the web layer may serve
`build_document()` as `/asyncapi.json`.

Over 300 lines on purpose: it is one document, built top-down (channels, then messages, then
header schemas), and reads best in one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.capture.access import FLUSH_INTERVAL
from app.settings import Settings

if TYPE_CHECKING:
    from app.wire.schemas import EventSchema

ASYNCAPI_VERSION = "3.0.0"
AVRO_SCHEMA_FORMAT = "application/vnd.apache.avro+json;version=1.9.0"
KAFKA_BINDING_VERSION = "0.5.0"
TITLE = "microservice-events"
FALLBACK_VERSION = "0.1.0"
#: Keys of the message of each channel (`#/channels/<topic>/messages/<key>`).
EVENT = "event"
DEAD_LETTER = "deadLetter"

Schema = dict[str, Any]


@dataclass(frozen=True)
class Channel:
    """One topic of the document and the operations on it."""

    topic: str
    description: str
    message: Schema
    message_key: str
    sender: str  # who publishes it, for the send operation; empty: nothing does in this configuration
    receiver: str = ""  # the worker's agents consuming it; empty: nothing here consumes it


def build_document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document (a JSON-ready dict) for `settings` (default: from the environment)."""
    settings = Settings.from_env() if settings is None else settings
    channels = _channels(settings)
    host = settings.bootstrap_servers if settings.kafka_broker else "localhost:9092"
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:microservice-events",
        "info": {
            "title": TITLE,
            "version": _package_version(),
            "description": (
                "Events of the entities written through the evented ORM, published from a "
                "transactional outbox. Topic `<entity>-v<N>`; Kafka key = entity key as UTF-8; "
                "value = plain Avro binary of the full event record, decodable with "
                "`schemas/<entity>/v<N>.avsc` alone (no registry, no framing); headers follow the "
                "CloudEvents Kafka binding in binary mode. Consumers deduplicate by `ce_id` "
                "(= `event_id`, kept through down-conversion) and order per key by `sequence`."
            ),
        },
        "servers": {
            "kafka": {
                "host": host,
                "protocol": "kafka",
                "description": "The broker of KAFKA_BROKER (Apache Kafka in docker-compose.yml, "
                               "the embedded Tansu broker under `python -m app dev`).",
            },
        },
        "defaultContentType": "application/avro",
        "channels": {c.topic: _channel_object(c, settings) for c in channels},
        "operations": _operations(channels, settings),
    }


def _package_version() -> str:
    """The installed package's version, or the fallback when running from an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TITLE)
    except PackageNotFoundError:
        return FALLBACK_VERSION


def _channels(settings: Settings) -> list[Channel]:
    """Every topic, in a stable order: per entity current, older versions, DLQ; then access, outbox DLQ."""
    from app.registry import load_models
    from app.topology import DOWNCONVERT, DUAL_PUBLISH, RELAY_DLQ_TOPIC, current_version, legacy_modes, root_model
    from app.wire.schemas import ACCESS_TOPIC, dlq_topic, load

    load_models(settings)  # the entities whose topics the document lists
    out: list[Channel] = []
    for entity, modes in sorted(legacy_modes(settings.legacy_overrides()).items()):
        current = load(entity, current_version(entity))
        dlq = dlq_topic(current.topic)
        agents = []
        # One pass (`process_<entity>`, agents/entity_pass.py) runs every job that reads the topic.
        jobs = []
        if DOWNCONVERT in modes.values():
            jobs.append("down-conversion, serving the older versions")
        # Every entity's latest-state table and the aggregations its model declares (agents/views.py).
        declared = ", ".join(f"`{a.name}`" for a in root_model(entity).__aggregations__)
        jobs.append(f"the latest-state table `{entity}`" + (f" and its aggregations {declared}" if declared else ""))
        if jobs:
            agents.append(f"`process_{entity}` ({'; '.join(jobs)})")
        agents.append(f"`refresh_cache_{entity}` (the Redis entity cache, when REDIS_URL is set)")
        redrive = {"dlq_redriven_from": _header(
            f"Only on a message re-sent from `{dlq}` by `python -m app dlq redrive`: "
            "`<dlq topic>:<partition>:<offset>` of the dead letter.")}
        out.append(Channel(
            current.topic,
            f"{entity} events at schema v{current.version}, the version the `{entity}` model writes. "
            f"Written by the outbox relay from committed outbox rows, in outbox order (= `sequence` "
            f"order per key), at least once.",
            _event_message(current, optional=redrive), EVENT,
            "the outbox relay (in the worker), from committed outbox rows",
            "the worker's agents " + ", ".join(agents)))
        for version, mode in sorted(modes.items(), reverse=True):
            old = load(entity, version)
            if mode == DUAL_PUBLISH:
                how = (f"Dual-published: the relay converts each `{current.topic}` event to v{version} "
                       f"and writes it here in the same batch, before deleting the outbox row.")
                sender = "the outbox relay (dual-publish)"
            else:
                how = (f"Down-converted by the worker's `process_{entity}` agent from "
                       f"`{current.topic}`: same key, partition and event id; what cannot be "
                       f"converted goes to `{dlq}`.")
                sender = f"the worker's `process_{entity}` agent (down-conversion)"
            out.append(Channel(
                old.topic,
                f"{entity} events at the older schema v{version}, for consumers not yet on "
                f"v{current.version} (mode `{mode}`; LEGACY_MODES switches it). {how} Both modes "
                f"give byte-identical messages.",
                _event_message(old), EVENT, sender))
        # The down-converter dead-letters what it cannot decode or convert; on a topic no
        # down-converter reads, the cache agent dead-letters what it cannot decode.
        downconverted = DOWNCONVERT in modes.values()
        writer = (f"the worker's `process_{entity}` agent (down-conversion)" if downconverted
                  else f"the worker's `refresh_cache_{entity}` agent")
        out.append(Channel(
            dlq,
            f"Dead letters of `{current.topic}`: messages {writer} could not decode"
            f"{' or convert' if downconverted else ''}, unchanged (key, value, original headers) "
            f"with why and where from in `dlq_*` headers. `python -m app dlq list|redrive {dlq}`.",
            _dead_letter_message(current), DEAD_LETTER, writer))
    access = load("access", 1)
    out.append(Channel(
        ACCESS_TOPIC,
        "ORM reads: every entity a session loads is noted in memory and flushed every "
        f"{FLUSH_INTERVAL:g} s as one event per entity read (service, distinct "
        "keys, count, first/last time), through the outbox. Kafka key: the entity read.",
        _event_message(access), EVENT, "the outbox relay, from access-log outbox rows"))
    out.append(Channel(
        RELAY_DLQ_TOPIC,
        "Outbox rows the relay could not encode as Avro, as JSON with why and where from in the "
        "`dlq_*` headers every dead letter has; the row leaves the outbox only once this message "
        f"is acked, so nothing is lost. `python -m app dlq list|redrive {RELAY_DLQ_TOPIC}` (redrive "
        "encodes the row again and publishes it).",
        _outbox_dead_letter_message(), DEAD_LETTER, "the outbox relay"))
    return out


def _channel_object(channel: Channel, settings: Settings) -> dict[str, Any]:
    """The AsyncAPI channel of one topic; the relay creates every topic with the same partition count."""
    return {
        "address": channel.topic,
        "title": channel.topic,
        "description": channel.description,
        "messages": {channel.message_key: channel.message},
        "bindings": {"kafka": {"partitions": settings.topic_partitions,
                               "bindingVersion": KAFKA_BINDING_VERSION}},
    }


def _operations(channels: list[Channel], settings: Settings) -> dict[str, Any]:
    """`send` for every topic this system publishes, `receive` for the ones the worker consumes."""
    out: dict[str, Any] = {}
    for c in channels:
        if not c.sender:
            continue
        out[f"send-{c.topic}"] = {
            "action": "send", "channel": _channel_ref(c), "messages": [_message_ref(c)],
            "title": f"Publish to {c.topic}", "description": f"Sent by {c.sender}.",
        }
    for c in channels:
        if c.receiver:
            out[f"receive-{c.topic}"] = {
                "action": "receive", "channel": _channel_ref(c), "messages": [_message_ref(c)],
                "title": f"Consume {c.topic}",
                "description": f"Consumed by {c.receiver}. Consumer group: the Faust app id.",
                "bindings": {"kafka": {"groupId": {"type": "string", "enum": [settings.app_id]},
                                       "bindingVersion": KAFKA_BINDING_VERSION}},
            }
    return out


def _channel_ref(channel: Channel) -> dict[str, str]:
    """A Reference Object to `channel`."""
    return {"$ref": f"#/channels/{channel.topic}"}


def _message_ref(channel: Channel) -> dict[str, str]:
    """A Reference Object to the message of `channel` (operations must point into their channel)."""
    return {"$ref": f"#/channels/{channel.topic}/messages/{channel.message_key}"}


def _header(description: str, **schema: Any) -> Schema:
    """A header's JSON Schema: Kafka header values are bytes, here UTF-8 strings."""
    return {"type": "string", "description": description, **schema}


def _ce_headers(schema: EventSchema) -> dict[str, Schema]:
    """The CloudEvents binary-mode headers of `schema`'s topic, as `app.wire.messages.ce_headers` writes them."""
    from app.wire.messages import CONTENT_TYPE
    from app.wire.schemas import field_type

    ops = field_type(schema.raw, "op")["symbols"]
    return {
        "ce_specversion": _header("CloudEvents specification version.", const="1.0"),
        "ce_id": _header("The event id (`event_id`); the same on every version of one event, so "
                         "consumers deduplicate by it.", format="uuid"),
        "ce_source": _header("`/services/<service>`: the service that raised the event.",
                             pattern="^/services/[^/]+$"),
        "ce_type": _header("`<entity>.<op>.v<N>`.",
                           enum=[f"{schema.entity}.{op}.v{schema.version}" for op in ops]),
        "ce_time": _header("`occurred_at`, RFC 3339, UTC.", format="date-time"),
        "ce_dataschema": _header("Names the Avro schema of the value: `schemas/<entity>/v<N>.avsc`.",
                                 const=schema.dataschema),
        "content-type": _header("The value's media type.", const=CONTENT_TYPE),
    }


def _avro_payload(schema: EventSchema) -> Schema:
    """A Multi Format Schema Object carrying the `.avsc` exactly as it is on disk."""
    return {"schemaFormat": AVRO_SCHEMA_FORMAT, "schema": schema.raw}


def _key(description: str) -> Schema:
    """The Kafka message binding: the key is a UTF-8 string."""
    return {"kafka": {"key": {"type": "string", "description": description},
                      "bindingVersion": KAFKA_BINDING_VERSION}}


def _event_message(schema: EventSchema, optional: dict[str, Schema] | None = None) -> Schema:
    """The message of an event topic: Avro value of `schema`, CloudEvents headers, string key."""
    headers = _ce_headers(schema)
    key = ("The entity that was read." if schema.entity == "access"
           else f"The {schema.entity} key (the aggregate's id) as UTF-8.")
    return {
        "name": f"{schema.entity}.v{schema.version}",
        "title": f"{schema.raw['name']} v{schema.version}",
        "summary": schema.raw.get("doc", f"An event of {schema.entity}, schema v{schema.version}."),
        "contentType": "application/avro",
        "headers": {"type": "object", "required": list(headers),
                    "properties": {**headers, **(optional or {})}},
        "payload": _avro_payload(schema),
        "bindings": _key(key),
    }


def _dead_letter_message(source: EventSchema) -> Schema:
    """A dead letter of `source`'s topic (agents/downconvert.py): the original message plus `dlq_*` headers."""
    reason = {
        "dlq_error_class": _header("Class of the error, e.g. `SchemaResolutionError`."),
        "dlq_error_message": _header("The error message, at most 1000 characters."),
        "dlq_source_topic": _header("The topic the message came from.", const=source.topic),
        "dlq_source_partition": _header("Its partition.", pattern="^[0-9]+$"),
        "dlq_source_offset": _header("Its offset.", pattern="^[0-9]+$"),
    }
    return {
        "name": f"{source.topic}.dead-letter",
        "title": f"Dead letter of {source.topic}",
        "summary": "The original message, unchanged; it is here because it could not be decoded "
                   "or converted, so its value may not match the schema below.",
        "contentType": "application/avro",
        # The original's headers follow, unchecked: they may be why it could not be converted.
        "headers": {"type": "object", "required": list(reason), "properties": reason,
                    "additionalProperties": _header("The original message's headers, unchanged "
                                                    "(its CloudEvents `ce_*` ones when it had them).")},
        "payload": _avro_payload(source),
        "bindings": _key("The original message's key."),
    }


def _outbox_dead_letter_message() -> Schema:
    """An outbox row the relay could not encode (app/outbox/relay.py `dead_letter`), as JSON."""
    return {
        "name": "outbox.dead-letter",
        "title": "Outbox dead letter",
        "summary": "An outbox row that could not be encoded as Avro, with its columns as JSON.",
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "required": ["dlq_error_class", "dlq_error_message", "dlq_source_topic", "dlq_outbox_id",
                         "content-type"],
            "properties": {
                "dlq_error_class": _header("Class of the encoding error."),
                "dlq_error_message": _header("The error message, at most 1000 characters."),
                "dlq_source_topic": _header("The topic the row was meant for (where redrive publishes it)."),
                "dlq_outbox_id": _header("The outbox row id.", pattern="^[0-9]+$"),
                "content-type": _header("The value's media type.", const="application/json"),
            },
        },
        "payload": {
            "type": "object",
            "description": "The outbox row.",
            "required": ["id", "topic", "entity", "schema_version", "key", "event_id", "op",
                         "service", "occurred_at", "sequence", "data"],
            "properties": {
                "id": {"type": "integer", "description": "Outbox row id (publication order)."},
                "topic": {"type": "string"},
                "entity": {"type": "string"},
                "schema_version": {"type": "integer"},
                "key": {"type": "string"},
                "event_id": {"type": "string", "format": "uuid"},
                "op": {"type": "string", "enum": ["create", "update", "delete", "read"]},
                "service": {"type": "string"},
                "occurred_at": {"type": "string", "description": "As PostgreSQL's timestamptz text."},
                "sequence": {"type": "integer"},
                "data": {"description": "The entity state as stored in the outbox (JSON), null on delete."},
            },
        },
        "bindings": _key("The row's entity key."),
    }
