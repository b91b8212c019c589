"""The transactional outbox: rows written with each write, and the relay that publishes them."""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.util import await_only

from app.entities import EntityPlan, record_sql
from app.schemas import topic_name

#: Idempotent DDL. `event_sequences` holds the per-aggregate sequence: its row lock
#: serializes writers of one aggregate, and it outlives a delete, so a re-created key
#: keeps counting up instead of restarting at 1 behind events consumers already applied.
DDL = [
    """CREATE TABLE IF NOT EXISTS event_sequences (
        entity text NOT NULL,
        key text NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (entity, key))""",
    """CREATE TABLE IF NOT EXISTS outbox (
        id bigserial PRIMARY KEY,
        topic text NOT NULL,
        entity text NOT NULL,
        schema_version int NOT NULL,
        key text NOT NULL,
        event_id uuid NOT NULL DEFAULT gen_random_uuid(),
        op text NOT NULL,
        service text NOT NULL,
        occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        sequence bigint NOT NULL,
        data json)""",
    # One NOTIFY per writing statement; PostgreSQL delivers it only on commit and folds
    # duplicates within a transaction, so a rolled-back write never wakes the relay.
    """CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN PERFORM pg_notify('outbox', ''); RETURN NULL; END $$""",
    "DROP TRIGGER IF EXISTS outbox_notify ON outbox",
    """CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
       FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()""",
]
CHANNEL = "outbox"

_LOCK_SEQS = """
INSERT INTO event_sequences AS s (entity, key, seq)
SELECT $1::text, k, 1 FROM unnest($2::text[]) AS k ORDER BY k
ON CONFLICT (entity, key) DO UPDATE SET seq = s.seq + 1
RETURNING s.key, s.seq"""

_ACCESS = text("""
INSERT INTO outbox (topic, entity, schema_version, key, op, service, sequence, occurred_at, data)
VALUES (:topic, :entity, 1, :entity, 'read', :service, 0, :first_at, CAST(:data AS json))""")


def install(conn: Connection) -> None:
    """Create the outbox, the sequences table and the NOTIFY trigger."""
    # An advisory lock keeps concurrent installers (several workers starting) from racing.
    conn.execute(text("SELECT pg_advisory_xact_lock(7325001)"))
    for statement in DDL:
        conn.execute(text(statement))


def record_events(conn: Connection, plan: EntityPlan, keys: dict[Any, str], service: str) -> None:
    """Write one outbox row per aggregate key, in the caller's transaction.

    Keys of aggregates that existed before this transaction get their sequence bumped first,
    in a statement of its own: that takes the aggregate's lock, so the state read by the
    next statement (a new snapshot) includes whatever a concurrent writer just committed.
    """
    str_keys = {str(k): op for k, op in keys.items()}
    existing = sorted(k for k, op in str_keys.items() if op != "create")
    driver = conn.connection.driver_connection  # asyncpg, in the flush's own transaction
    seqs: dict[str, int] = {}
    if existing:
        rows = await_only(driver.fetch(_LOCK_SEQS, plan.root_entity, existing))
        seqs = {key: seq for key, seq in rows}
    ordered = sorted(str_keys)
    await_only(driver.execute(record_sql(plan.root), ordered, [str_keys[k] for k in ordered],
                              [seqs.get(k) for k in ordered], service))


def record_access(conn: Connection, service: str,
                  batches: dict[tuple[str, str | None], dict[str, Any]]) -> None:
    """Write one `access-v1` outbox row per entity read (and service it was read for)."""
    conn.execute(_ACCESS, [
        {"topic": topic_name("access", 1), "entity": entity, "service": service,
         "first_at": batch.pop("first_at"), "data": json.dumps(batch)}
        for (entity, _), batch in batches.items()
    ])
