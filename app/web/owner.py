"""`/services/<owner>/<entity>/<key>/`: an owner service answers for its entities' sensitive fields.

Sensitive columns never leave their owner's database but here. Another service asks the owner
over HTTP with its bearer token (`SERVICE_TOKENS="orders:<token>,…"`) and gets the entity's
columns plus the sensitive ones it may read. Who may read a field is configured per entity
and field: `sensitive_column(..., readers=("orders", "support"))` beside the model, which
`FIELD_READERS="customers.email=orders|support"` overrides without a code change. The owner
reads through its own evented `Database`, on behalf of the caller, so the access events say
who the data was read for. A process mounts the API of each service `OWNER_APIS` names, for
every entity that service owns with a sensitive column (the demo's worker: `customers`).

Only the root table's columns are served; an extension's sensitive columns are not (none of
the demo's has one).
"""
from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import faust
from faust.web import Request, Response
from faust.web import View as FaustView
from sqlalchemy import BigInteger, Integer, SmallInteger
from sqlalchemy import inspect as sa_inspect

from app.settings import Settings
from app.web.entities import check_entity_key
from app.web.errors import HttpError, guarded
from app.web.params import check_key, parse_query, path_segments

if TYPE_CHECKING:
    from app.orm import Database, EventedBase


def caller_of(authorization: str | None, tokens: Mapping[str, str]) -> str:
    """The calling service named by a `Bearer` token; HttpError(401) otherwise (pure)."""
    if not authorization:
        raise unauthorized("missing Authorization: Bearer <service token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("Authorization must be 'Bearer <service token>'")
    token = token.strip()
    for service, expected in tokens.items():
        if hmac.compare_digest(token.encode(), expected.encode()):
            return service
    raise unauthorized("unknown service token")


def unauthorized(error: str) -> HttpError:
    return HttpError(401, error, {"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class OwnedEntity:
    """An entity an owner API serves: its root model and who may read each sensitive column."""

    model: type[EventedBase]
    readers: dict[str, frozenset[str]]  # sensitive column attribute -> services that may read it

    def readable_by(self, caller: str) -> list[str]:
        """The sensitive attributes `caller` may read."""
        return sorted(attr for attr, services in self.readers.items() if caller in services)


def owned_entities(owner: str, overrides: Mapping[tuple[str, str], frozenset[str]]) -> dict[str, OwnedEntity]:
    """Entity -> what `owner`'s API serves: its root entities with at least one sensitive column."""
    from app.topology import root_models

    out = {}
    for model in root_models():
        if model.__owner__ != owner:
            continue
        readers = {}
        for prop in sa_inspect(model).column_attrs:
            column = prop.columns[0]
            if column.info.get("sensitive"):
                declared = frozenset(column.info.get("readers", ()))
                readers[prop.key] = overrides.get((model.__entity__, column.name), declared)
        if readers:
            out[model.__entity__] = OwnedEntity(model, readers)
    return out


def plain(value: Any) -> Any:
    """A column value as JSON carries it."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


class OwnerApi:
    """One owner service's API: its entities, read through its own evented Database."""

    def __init__(self, settings: Settings, owner: str) -> None:
        self.settings = settings
        self.owner = owner
        self.entities = owned_entities(owner, settings.field_reader_map())
        self._db: Database | None = None

    @property
    def db(self) -> Database:
        """The owner's Database, on its role, opened on first use."""
        if self._db is None:
            from app.orm import Database
            self._db = Database(self.settings.database_url_for(self.owner), service=self.owner)
        return self._db

    async def read(self, caller: str, entity: str, key: str) -> dict[str, Any]:
        """`entity[key]` with the sensitive fields `caller` may read; HttpError otherwise."""
        served = self.entities.get(entity)
        if served is None:
            raise HttpError(404, f"service {self.owner!r} serves no entity {entity!r}", entity=entity)
        fields = served.readable_by(caller)
        if not fields:
            raise HttpError(403, f"service {caller!r} may read no sensitive field of {entity}", entity=entity)
        model = served.model
        key = check_entity_key(model, key)
        [pk] = sa_inspect(model).primary_key
        ident: Any = int(key) if isinstance(pk.type, (BigInteger, Integer, SmallInteger)) else key
        async with self.db.session(on_behalf_of=caller) as session:
            row = await session.get(model, ident)
            if row is None:
                raise HttpError(404, "entity not found", entity=entity, key=key)
            hidden = set(served.readers) - set(fields)
            state = {prop.key: plain(getattr(row, prop.key)) for prop in sa_inspect(model).column_attrs
                     if prop.key not in hidden}
        return {"entity": entity, "key": key, "state": state}

    async def close(self) -> None:
        """Close the owner's database pool."""
        if self._db is not None:
            await self._db.close()
            self._db = None


class OwnerApis:
    """The owner APIs one process mounts (`OWNER_APIS`), by service name."""

    def __init__(self, settings: Settings) -> None:
        self.tokens = settings.service_token_map()
        self.apis = {owner: OwnerApi(settings, owner) for owner in settings.owner_apis}

    async def answer(self, endpoint: FaustView, request: Request) -> Response:
        segments = path_segments(request.rel_url.raw_path, "/services", ("service", "entity", "key"))
        parse_query(request.rel_url.raw_query_string, ())
        if len(segments) != 3:
            raise HttpError(404, "not found: use /services/<owner>/<entity>/<key>/")
        caller = caller_of(request.headers.get("Authorization"), self.tokens)  # before saying what exists
        owner, entity, key = (check_key(value, name) for value, name in zip(segments, ("service", "entity", "key")))
        api = self.apis.get(owner)
        if api is None:
            raise HttpError(404, f"no owner API of service {owner!r} here", service=owner)
        return endpoint.json(await api.read(caller, entity, key))

    async def close(self) -> None:
        for api in self.apis.values():
            await api.close()


def install(app: faust.App, settings: Settings) -> OwnerApis:
    """Mount `/services/…` for the owner APIs `settings.owner_apis` names (none: every path 404s)."""
    apis = OwnerApis(settings)

    # A catch-all route: aiohttp's own 404 for odd paths would be text, not a JSON error.
    @app.page("/services{tail:[\\s\\S]*}", name="mse-owner-apis")
    class OwnerMethods(FaustView):
        """GET an entity with the sensitive fields the caller's service may read."""

        async def get(self, request: Request, **_: Any) -> Response:
            # An unexpected error is a bare 500, never a traceback to a caller.
            return await guarded(self, request, lambda: apis.answer(self, request), "services")

    return apis
