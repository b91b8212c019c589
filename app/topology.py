"""Every entity, schema version, legacy mode and topic, from the models: the one place to ask.

The relay, the stream agents, the CLI, the AsyncAPI document and the metrics read these
facts here instead of each walking the model registry (or building topic names) itself.
`root_models` lives in app/orm.py, next to the base, which installs the capture triggers
with it; it is re-exported here.
"""
from __future__ import annotations

from app.capture.base import root_models
from app.wire.schemas import ACCESS_TOPIC, dlq_topic, topic_name
from app.settings import LEGACY_MODES, Settings

__all__ = ["DOWNCONVERT", "DUAL_PUBLISH", "current_topic", "current_version", "downconvert_targets",
           "dual_publish_targets", "evented_topics", "legacy_modes", "root_models"]

#: How an older schema version of an entity is served.
DUAL_PUBLISH, DOWNCONVERT = LEGACY_MODES


def legacy_modes(overrides: dict[tuple[str, int], str] | None = None) -> dict[str, dict[int, str]]:
    """entity -> {older version: how it is served}, from the models and the overrides."""
    out = {model.__entity__: dict(model.__legacy__) for model in root_models()}
    for (entity, version), mode in (overrides or {}).items():
        out.setdefault(entity, {})[version] = mode
    return out


def current_version(entity: str) -> int:
    """The schema version the root model of `entity` writes."""
    for model in root_models():
        if model.__entity__ == entity:
            return model.__schema_version__
    raise LookupError(f"no evented model for entity {entity!r}")


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
