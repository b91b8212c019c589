"""Every entity, schema version, legacy mode and topic, from the models: the one place to ask.

The relay, the stream agents, the CLI, replay, the AsyncAPI document and the metrics read
these facts here instead of each walking the model registry (or building topic names) itself:
event topics and their dead letters, the relay's dead-letter topic, and the worker's view
topics (table changelogs and the views' repartition topics). `root_models` lives in
app/capture/model.py, next to the base, and is re-exported here.
"""
from __future__ import annotations

from app.capture.model import EventedBase, root_models
from app.settings import LEGACY_MODES, Settings
from app.views import Aggregation
from app.wire.schemas import ACCESS_TOPIC, dlq_topic, load, topic_name

__all__ = ["aggregation_names", "aggregations_of", "DOWNCONVERT", "DUAL_PUBLISH", "RELAY_DLQ_TOPIC", "changelog_topic",
           "current_topic", "current_version", "downconvert_targets", "dual_publish_targets",
           "evented_topics", "inbox_dead_letter_topic", "is_view_topic", "legacy_modes", "root_models", "updates_topic",
           "view_dead_letter_topics", "worker_topics"]

#: Where the relay dead-letters an outbox row it cannot publish.
RELAY_DLQ_TOPIC = "outbox.dlq"

#: How an older schema version of an entity is served.
DUAL_PUBLISH, DOWNCONVERT = LEGACY_MODES


def legacy_modes(overrides: dict[tuple[str, int], str] | None = None) -> dict[str, dict[int, str]]:
    """entity -> {older version: how it is served}, from the models and the overrides."""
    out = {model.__entity__: dict(model.__legacy__) for model in root_models()}
    for (entity, version), mode in (overrides or {}).items():
        out.setdefault(entity, {})[version] = mode
    return out


def root_model(entity: str) -> type[EventedBase]:
    """The root model of `entity`."""
    for model in root_models():
        if model.__entity__ == entity:
            return model
    raise LookupError(f"no evented model for entity {entity!r}")


def current_version(entity: str) -> int:
    """The schema version the root model of `entity` writes."""
    return root_model(entity).__schema_version__


def aggregations_of(entity: str) -> list[Aggregation]:
    """The aggregations `entity`'s model declares, checked against its current schema
    (`ValueError` naming the first field the schema cannot give)."""
    model = root_model(entity)
    fields = load(entity, model.__schema_version__).data_fields()
    return [declared.bind(fields) for declared in model.__aggregations__]


def aggregation_names() -> list[str]:
    """Every aggregation's table name, kept by stage 2 (`agents/views.py`) from its own
    repartition topic."""
    return [declared.name for model in root_models() for declared in model.__aggregations__]


def current_topic(entity: str) -> str:
    """The topic of `entity`'s current schema version."""
    return topic_name(entity, current_version(entity))


def evented_topics() -> list[str]:
    """Every topic events go to: each root entity's current and older versions, access events."""
    topics = {ACCESS_TOPIC}
    for model in root_models():
        current = topic_name(model.__entity__, model.__schema_version__)
        # Its dead letters: of down-conversion, or of the cache agent when there is none.
        topics.update((current, dlq_topic(current)))
        topics.update(topic_name(model.__entity__, v) for v in model.__legacy__)
    return sorted(topics)


def _versions_served_by(mode: str, settings: Settings) -> dict[str, list[int]]:
    """entity -> its older versions served in `mode`, newest first (entities with none left out)."""
    out = {}
    for entity, modes in legacy_modes(settings.legacy_overrides()).items():
        versions = sorted((v for v, m in modes.items() if m == mode), reverse=True)
        if versions:
            out[entity] = versions
    return out


def downconvert_targets(settings: Settings) -> dict[str, list[int]]:
    """entity -> the older versions the worker serves by down-conversion."""
    return _versions_served_by(DOWNCONVERT, settings)


def dual_publish_targets(settings: Settings) -> dict[str, tuple[int, ...]]:
    """current topic -> the older versions the relay publishes too, for every entity."""
    dual = _versions_served_by(DUAL_PUBLISH, settings)
    entities = legacy_modes(settings.legacy_overrides())
    return {current_topic(entity): tuple(dual.get(entity, ())) for entity in entities}


def changelog_topic(app_id: str, table: str) -> str:
    """The changelog topic of view table `table` of the worker app `app_id`."""
    return f"{app_id}-{table}-changelog"


def updates_topic(app_id: str, view: str) -> str:
    """The repartition topic stage 1 sends view `view`'s per-partition aggregates on."""
    return f"{app_id}-{view}-updates"


def view_dead_letter_topics(app_id: str) -> list[str]:
    """The dead-letter topics of the repartition topics (created before the worker starts)."""
    return [dlq_topic(updates_topic(app_id, view)) for view in aggregation_names()]


def is_view_topic(app_id: str, topic: str) -> bool:
    """Whether `topic` holds view state of `app_id` (a changelog or a repartition topic):
    what replay deletes so the views rebuild from the event topics."""
    return topic.startswith(f"{app_id}-") and topic.endswith(("-changelog", "-updates"))


def worker_topics(app_id: str) -> list[str]:
    """Every topic that must exist before the worker starts: event topics and their dead
    letters, the relay's dead letters, the views' dead letters."""
    return [*evented_topics(), RELAY_DLQ_TOPIC, *view_dead_letter_topics(app_id)]


def inbox_dead_letter_topic(source_topic: str, consumer: str) -> str:
    """Where inbox consumer `consumer` dead-letters what it cannot apply from `source_topic`:
    its own topic, so one consumer's failures are told apart from the worker's."""
    return dlq_topic(f"{source_topic}.{consumer}")
