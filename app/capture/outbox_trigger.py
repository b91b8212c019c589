"""The capture triggers, which write the outbox row of every entity write: their SQL, and the
SQL of an aggregate's state as an event carries it (also what `snapshot` publishes).
"""
from __future__ import annotations

import re
from functools import cache
from typing import Any

from sqlalchemy import Column, Connection, DateTime, inspect

from app.capture.model import EventedBase, root_models
from app.capture.ownership import owner_of
from app.capture.plans import plan_for


def _value_sql(alias: str, column: Column[Any]) -> str:
    """SQL for one column's value in the event's JSON: timestamps as epoch microseconds."""
    ref = f'{alias}."{column.name}"'
    if isinstance(column.type, DateTime):
        return f"(extract(epoch from {ref}) * 1000000)::bigint"
    return ref


def _object_sql(alias: str, model: type[EventedBase], fields: list[dict[str, Any]]) -> list[str]:
    """`'name', value` pairs for json_build_object, for the schema fields that are columns."""
    cols = inspect(model).columns
    return [f"'{f['name']}', {_value_sql(alias, cols[f['name']])}" for f in fields if f["name"] in cols]


@cache
def state_sql(root: type[EventedBase], key: str = "ev.key") -> str:
    """A scalar subquery giving the JSON state of the aggregate whose key (as text) is `key`."""
    plan = plan_for(root)
    parts = _object_sql("r", root, plan.fields)
    for ext in extensions_of(root):
        ep = plan_for(ext)
        inner = ", ".join(_object_sql("e", ext, ep.fields))
        parts.append(
            f"'{ext.__extension_field__}', (SELECT json_build_object({inner}) "
            f'FROM "{ep.table.name}" e WHERE e."{ep.key_column.name}" = r."{plan.key_column.name}")'
        )
    key_type = plan.key_column.type.compile(dialect=_pg_dialect())
    return (
        f"(SELECT json_build_object({', '.join(parts)}) FROM \"{plan.table.name}\" r "
        f"WHERE r.\"{plan.key_column.name}\" = CAST({key} AS {key_type}))"
    )


def extensions_of(root: type[EventedBase]) -> list[type[EventedBase]]:
    """The models that extend `root`."""
    return [m.class_ for m in root.registry.mappers if getattr(m.class_, "__extends__", None) is root]


@cache
def _pg_dialect() -> Any:
    from sqlalchemy.dialects import postgresql
    return postgresql.dialect()


_CAPTURE_FUNCTION = """
CREATE OR REPLACE FUNCTION "{function}"() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
  k text;
  s bigint;
  id bigint;
BEGIN
  IF TG_OP = 'DELETE' THEN k := OLD."{key}"::text; ELSE k := NEW."{key}"::text; END IF;
  INSERT INTO event_sequences AS q (entity, key, seq, xact, outbox_id)
  VALUES ({entity}, k, 1, pg_current_xact_id(), nextval('outbox_id_seq'))
  ON CONFLICT (entity, key) DO UPDATE
    SET seq = q.seq + 1, xact = excluded.xact, outbox_id = nextval('outbox_id_seq')
    WHERE q.xact IS DISTINCT FROM excluded.xact
  RETURNING q.seq, q.outbox_id INTO s, id;
  -- The state is read by the next statement, so in a new snapshot: it includes what a
  -- writer that held the key's lock above committed meanwhile.
  IF s IS NOT NULL THEN
    -- Wake the relays once per transaction (the outbox's own NOTIFY trigger skips rows
    -- written here): NOTIFY is delivered at commit and folded anyway, but each call costs.
    IF current_setting('mse.notified', true) IS DISTINCT FROM pg_current_xact_id()::text THEN
      PERFORM pg_notify('outbox', '');
      PERFORM set_config('mse.notified', pg_current_xact_id()::text, true);
    END IF;
    INSERT INTO outbox (id, topic, entity, schema_version, key, op, service, sequence, data)
    SELECT id, {topic}, {entity}, {version}, k,
           CASE WHEN st.state IS NULL THEN 'delete' WHEN {created} THEN 'create' ELSE 'update' END,
           {owner}, s, st.state
    FROM (SELECT {state} AS state) st;
  ELSE
    UPDATE outbox o SET data = st.state,
      op = CASE WHEN st.state IS NULL THEN 'delete' WHEN o.op = 'delete' THEN 'create' ELSE o.op END
    FROM event_sequences q, (SELECT {state} AS state) st
    WHERE q.entity = {entity} AND q.key = k AND o.id = q.outbox_id;
  END IF;
  RETURN NULL;
END $fn$"""

_CAPTURE_TRIGGER = """
CREATE CONSTRAINT TRIGGER mse_capture AFTER INSERT OR UPDATE OR DELETE ON "{table}"
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{function}"()"""


def capture_sql(root: type[EventedBase]) -> list[str]:
    """DDL of the capture triggers of `root` and its extensions (idempotent).

    Each entity table gets a deferred constraint trigger: PostgreSQL queues one entry per
    written row and runs the queue at COMMIT, inside the committing transaction. The outbox
    row costs the writer no round trip of its own, it carries the aggregate's state as
    committed, and a write made with raw SQL, on any connection, raises its event too.

    For one aggregate key, the first entry of a transaction takes the key's row in
    `event_sequences` (its lock serializes the key's writers; `xact` marks the key as done in
    this transaction), reads the state in a fresh snapshot (so it includes what a writer that
    held the lock just committed) and inserts the outbox row: one event per aggregate per
    transaction. Later entries of the key (a root and its extension, a second flush) find
    `xact` set and only refresh that row's state: under `SET CONSTRAINTS ... IMMEDIATE` they
    run after later writes, which the event must carry. The outbox id is drawn under the key's
    lock, so a key's events have ids in sequence order and the relay's `ORDER BY id` keeps it.

    SECURITY DEFINER (owned by whoever installs the schema): the service roles need no UPDATE
    on the outbox, and `service` is the entity's owner, the one role PostgreSQL lets write the
    table, whatever the connection claims.
    """
    plan = plan_for(root)
    out: list[str] = []
    for model in [root, *extensions_of(root)]:
        mp = plan_for(model)
        table = _identifier(mp.table.name)
        function = f"mse_capture_{table}"
        out += [
            _CAPTURE_FUNCTION.format(
                function=function, key=_identifier(mp.key_column.name),
                entity=_literal(plan.root_entity), topic=_literal(plan.schema.topic),
                version=int(plan.version), owner=_literal(owner_of(root)), state=state_sql(root, "k"),
                # A root row inserted (or deleted and inserted again) in this transaction is
                # a create; an extension's row never is: its root's own entry came first.
                created="TG_OP IN ('INSERT', 'DELETE')" if mp.is_root else "false"),
            # PostgreSQL checks EXECUTE when a trigger is created, not when it fires: without
            # it no role can attach the function to a table of its own and raise the owner's
            # events through it.
            f'REVOKE ALL ON FUNCTION "{function}"() FROM PUBLIC',
            f'DROP TRIGGER IF EXISTS mse_capture ON "{table}"',
            _CAPTURE_TRIGGER.format(table=table, function=function),
        ]
    return out


def _identifier(name: str) -> str:
    """A table or column name defined in code, checked before it goes into DDL."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"unexpected characters in name {name!r}")
    return name


def _literal(value: str) -> str:
    """A SQL string literal of a name defined in code (entity, topic)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"unexpected characters in {value!r}")
    return f"'{value}'"


def create_capture_triggers(conn: Connection) -> None:
    """Create or replace the capture trigger of every entity table (`capture_sql`)."""
    for model in root_models():
        for statement in capture_sql(model):
            conn.exec_driver_sql(statement)
