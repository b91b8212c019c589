"""One PostgreSQL role per service, with privileges derived from the models.

The ORM's ownership checks give early, clear errors; these privileges are what holds when
code goes around the ORM (raw SQL, `SELECT *`, row-to-JSON, triggers, `COPY`, `pg_stats`).
PostgreSQL checks them on every statement, whatever the client:

- a service's role reads and writes every column of the entities it owns (and their
  extension tables), and may SELECT only the non-sensitive columns of the others';
- no service role may INSERT/UPDATE/DELETE another's entity, create a trigger on any entity
  table, or ANALYZE one (those need the table's owner: the role that ran `init-db`);
- the outbox is INSERT-only for services, under row-level security: a row must name the
  inserting service and an entity it owns (or be an access event), so no service can forge
  another's events; no service may read the outbox. The per-key sequences of an entity are
  writable only by its owner and readable by every role (the cache's database fallback loads
  a key's state with its sequence in one snapshot: `app/cache.py`). The worker's role reads
  and deletes outbox rows (the relay) and reads the non-sensitive columns of every entity
  (cache refresh, `/entities`);
- the inbox (app/inbox/store.py) is row-level secured by consumer name: a service reads and
  writes only the rows of its own consumers (`<service>`, `<service>.*`), so it cannot mark
  another service's events as applied.

Roles are cluster-wide in PostgreSQL; the grants are per database, so `init-db` run against
several databases of one cluster shares the roles and grants in each.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, Table, text
from sqlalchemy.engine import make_url

from app.capture.model import EventedBase

# The stream worker's role: defined in app/settings.py (the relay reads it there), named here
# with the services' roles it is provisioned beside.
from app.settings import WORKER

#: Held while provisioning, so two `init-db` runs do not interleave their REVOKE/GRANTs.
_LOCK = 7325002


@dataclass(frozen=True)
class EntityTables:
    """The tables of one entity (root and extensions), who owns them, what is sensitive."""

    entity: str
    owner: str
    tables: tuple[Table, ...]
    sensitive: frozenset[tuple[str, str]]  # (table, column)


def role_name(prefix: str, service: str) -> str:
    """The PostgreSQL role of `service`: `<prefix><service>`, checked to be a plain identifier."""
    name = f"{prefix}{service}"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"role name {name!r} (prefix {prefix!r} + service {service!r}) must be "
                         "lower-case letters, digits and underscores, at most 63 characters")
    return name


def entity_tables(base: type[EventedBase]) -> list[EntityTables]:
    """Every entity with its tables, from the models."""
    by_entity: dict[str, tuple[str, list[Table], set[tuple[str, str]]]] = {}
    for mapper in sorted(base.registry.mappers, key=lambda m: m.class_.__name__):
        model = mapper.class_
        root = model.__extends__ or model
        _, tables, sensitive = by_entity.setdefault(root.__entity__, (root.__owner__, [], set()))
        table = model.__table__
        tables.append(table)
        sensitive.update((table.name, c.name) for c in table.columns if c.info.get("sensitive"))
    return [EntityTables(entity, owner, tuple(tables), frozenset(sensitive))
            for entity, (owner, tables, sensitive) in sorted(by_entity.items())]


def services(base: type[EventedBase], extra: tuple[str, ...] = ()) -> list[str]:
    """Every service that gets a role: the owners in the models, plus `extra` (readers only)."""
    owners = {e.owner for e in entity_tables(base)}
    if WORKER in owners:
        raise ValueError(f"service name {WORKER!r} is reserved for the stream worker's role")
    return sorted(owners | set(extra) | {WORKER})


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def grant_sql(base: type[EventedBase], prefix: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The statements that (re)set every privilege, idempotently; roles must exist."""
    entities = entity_tables(base)
    all_services = services(base, extra)
    roles = {s: role_name(prefix, s) for s in all_services}
    role_list = ", ".join(_q(r) for r in roles.values())
    out = [f"GRANT USAGE ON SCHEMA public TO {role_list}"]
    for ent in entities:
        for table in ent.tables:
            name = _q(table.name)
            # From scratch each time: a column that became sensitive loses its grants.
            out.append(f"REVOKE ALL ON {name} FROM PUBLIC, {role_list}")
            out.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {_q(roles[ent.owner])}")
            public_cols = ", ".join(_q(c.name) for c in table.columns
                                    if (table.name, c.name) not in ent.sensitive)
            readers = ", ".join(_q(r) for s, r in roles.items() if s != ent.owner)
            if readers:
                out.append(f"GRANT SELECT ({public_cols}) ON {name} TO {readers}")
    writers = [s for s in all_services if s != WORKER]
    worker = _q(roles[WORKER])
    out += [
        "REVOKE ALL ON outbox, event_sequences FROM PUBLIC, " + role_list,
        "REVOKE ALL ON SEQUENCE outbox_id_seq FROM PUBLIC, " + role_list,
        "ALTER TABLE outbox ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE event_sequences ENABLE ROW LEVEL SECURITY",
        f"GRANT SELECT, DELETE ON outbox TO {worker}",
        f"DROP POLICY IF EXISTS {_q('relay_' + roles[WORKER])} ON outbox",
        f"CREATE POLICY {_q('relay_' + roles[WORKER])} ON outbox FOR ALL TO {worker} USING (true)",
        # Sequences are no secret: every role reads them (the cache loads a state with its
        # sequence in one snapshot, from any service); only owners write theirs (below).
        f"GRANT SELECT ON event_sequences TO {role_list}",
    ]
    for role in roles.values():
        policy = _q(f"reads_of_{role}")
        out += [f"DROP POLICY IF EXISTS {policy} ON event_sequences",
                f"CREATE POLICY {policy} ON event_sequences FOR SELECT TO {_q(role)} USING (true)"]
    for service in writers:
        role = _q(roles[service])
        owned = [e.entity for e in entities if e.owner == service]
        owned_sql = "ARRAY[" + ", ".join(_lit(e) for e in owned) + "]::text[]"
        # Named after the role: roles of another prefix may hold policies in this database too.
        policy = _q(f"writes_of_{roles[service]}")
        out += [
            f"GRANT INSERT ON outbox TO {role}",
            f"GRANT USAGE ON SEQUENCE outbox_id_seq TO {role}",
            f"DROP POLICY IF EXISTS {policy} ON outbox",
            # Its own name, and either an event of an entity it owns on that entity's topic, or
            # an access event (a read it made of any entity).
            f"CREATE POLICY {policy} ON outbox FOR INSERT TO {role} WITH CHECK ("
            f"service = {_lit(service)} AND ("
            f"(entity = ANY({owned_sql}) AND topic = entity || '-v' || schema_version::text)"
            " OR (topic = 'access-v1' AND op = 'read')))",
            f"DROP POLICY IF EXISTS {policy} ON event_sequences",
        ]
        if owned:
            out += [
                f"GRANT SELECT, INSERT, UPDATE ON event_sequences TO {role}",
                f"CREATE POLICY {policy} ON event_sequences FOR ALL TO {role} "
                f"USING (entity = ANY({owned_sql})) WITH CHECK (entity = ANY({owned_sql}))",
            ]
    # The inbox (app/inbox/store.py): each service reads and writes only the rows of consumers
    # named after it, so one service cannot mark another's events as applied.
    out += [
        "REVOKE ALL ON inbox, inbox_keys FROM PUBLIC, " + role_list,
        "ALTER TABLE inbox ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE inbox_keys ENABLE ROW LEVEL SECURITY",
    ]
    for service in writers:
        role = _q(roles[service])
        mine = f"(consumer = {_lit(service)} OR starts_with(consumer, {_lit(service + '.')}))"
        policy = _q(f"inbox_of_{roles[service]}")
        out.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON inbox, inbox_keys TO {role}")
        for inbox_table in ("inbox", "inbox_keys"):
            out += [f"DROP POLICY IF EXISTS {policy} ON {inbox_table}",
                    f"CREATE POLICY {policy} ON {inbox_table} FOR ALL TO {role} USING {mine} WITH CHECK {mine}"]
    return out


def provision(conn: Connection, base: type[EventedBase], prefix: str,
              passwords: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """Create the roles (LOGIN) that do not exist, set passwords given, and grant; returns the roles.

    Runs as the tables' owner (the role `init-db` connects as), after the tables exist.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK})
    names = []
    for service in services(base, extra):
        role = role_name(prefix, service)
        names.append(role)
        # Roles are cluster-wide: another database's init-db may have created it already.
        conn.execute(text(
            "DO $$ BEGIN CREATE ROLE " + _q(role) + " LOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"))
        password = (passwords or {}).get(service)
        if password:
            conn.execute(text(f"ALTER ROLE {_q(role)} PASSWORD {_lit(password)}"))
    for ent in entity_tables(base):
        for table in ent.tables:
            for column in table.columns:
                seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                   {"t": table.name, "c": column.name}).scalar()
                if seq:  # the owner inserts rows, so it draws their ids
                    conn.execute(text(f"REVOKE ALL ON SEQUENCE {seq} FROM PUBLIC"))
                    conn.execute(text(f"GRANT USAGE, SELECT ON SEQUENCE {seq} TO "
                                      f"{_q(role_name(prefix, ent.owner))}"))
    for statement in grant_sql(base, prefix, extra):
        conn.execute(text(statement))
    return names


def drop_roles(conn: Connection, base: type[EventedBase], prefix: str,
               extra: tuple[str, ...] = ()) -> None:
    """Drop the roles (after every database that granted them something was dropped)."""
    for service in services(base, extra):
        conn.execute(text(f"DROP ROLE IF EXISTS {_q(role_name(prefix, service))}"))


def service_urls(base: type[EventedBase], prefix: str, url: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """service -> `url` connecting as that service's role (no password: trust or `.pgpass`)."""
    return {service: service_url(url, role_name(prefix, service)) for service in services(base, extra)}


def service_url(url: str, role: str, password: str | None = None) -> str:
    """`url` with its user replaced by `role` (and its password by `password`, or none)."""
    return make_url(url).set(username=role, password=password).render_as_string(hide_password=False)


def role_passwords(urls: dict[str, str], prefix: str) -> dict[str, str]:
    """service -> password, from per-service URLs; a URL naming another role is an error."""
    out = {}
    for service, url in urls.items():
        parsed = make_url(url)
        expected = role_name(prefix, service)
        if parsed.username != expected:
            raise ValueError(f"DATABASE_URL_{service.upper()} connects as {parsed.username!r}; "
                             f"the role of service {service!r} is {expected!r}")
        if parsed.password:
            out[service] = str(parsed.password)
    return out
