"""`/entities/<entity>/<key>/`: an entity's current state for request/response callers.

Reads go through the worker's one Redis read-through repository (`app.cache.CacheResource`,
shared with the cache agents and closed with the worker), sensitive columns excluded.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import faust
from faust.web import Request, Response
from faust.web import View as FaustView
from sqlalchemy import BigInteger, Integer, SmallInteger
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DataError, SQLAlchemyError

from app.settings import Settings
from app.web.errors import HttpError, bad
from app.web.params import check_key, parse_query, path_segments

if TYPE_CHECKING:
    from app.cache import CacheRepository, CacheResource
    from app.orm import EventedBase

log = logging.getLogger(__name__)

#: Key column types whose keys must be integers, with their ranges.
INT_RANGES: tuple[tuple[type, int], ...] = ((BigInteger, 63), (SmallInteger, 15), (Integer, 31))


class EntityReads:
    """The `/entities/` handler, reading through the worker's cache repository."""

    def __init__(self, app: faust.App, settings: Settings, cache: CacheResource | None) -> None:
        """Entity reads on `app` through `cache` (None without `REDIS_URL`: reads answer 503)."""
        self.app = app
        self.settings = settings
        self.cache = cache

    async def entities(self, endpoint: FaustView, request: Request) -> Response:
        """`/entities/` (the entity names) and `/entities/<entity>/<key>/`."""
        segments = path_segments(request.rel_url.raw_path, "/entities", ("entity", "key"))
        parse_query(request.rel_url.raw_query_string, ())
        models = self.models()
        if not segments:
            return endpoint.json({"entities": sorted(models)})
        entity = check_key(segments[0], "entity")
        model = models.get(entity)
        if model is None:
            raise HttpError(404, "unknown entity", entity=entity)
        if len(segments) == 1:
            raise HttpError(404, "not found: use /entities/<entity>/<key>/", entity=entity)
        key = check_entity_key(model, check_key(segments[1], "key"))
        repository = self.repository()
        try:
            state = await repository.get(model, key)
        except DataError:
            raise bad("key", f"not a valid key of {entity}") from None
        except (SQLAlchemyError, OSError, asyncio.TimeoutError) as exc:
            log.warning("web: entity read %s/%s failed: %r", entity, key, exc)
            raise HttpError(503, "entity store unavailable", {"Retry-After": "1"}, entity=entity, key=key) from None
        if state is None:
            raise HttpError(404, "entity not found", entity=entity, key=key)
        return endpoint.json({"entity": entity, "key": key, "state": state})

    def models(self) -> dict[str, type[EventedBase]]:
        """Entity name -> root model."""
        from app.topology import root_models

        return {model.__entity__: model for model in root_models()}

    def repository(self) -> CacheRepository:
        """The worker's repository (connected on first use), or 503 when it has none."""
        if self.cache is None or not self.settings.database_url:
            raise HttpError(503, "entity reads need REDIS_URL and DATABASE_URL")
        return self.cache.repo


def check_entity_key(model: type[EventedBase], key: str) -> str:
    """`key` if it fits the type of the model's key column (integers in range)."""
    columns = sa_inspect(model).primary_key
    if len(columns) != 1:
        return key
    column_type = columns[0].type
    for kind, bits in INT_RANGES:
        if isinstance(column_type, kind):
            body = key[1:] if key.startswith("-") else key
            if not body.isascii() or not body.isdigit():
                raise bad("key", f"must be an integer for {model.__entity__}")
            if not -(2 ** bits) <= int(key) < 2 ** bits:
                raise bad("key", "out of range")
            return key
    return key
