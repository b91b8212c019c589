"""Snapshots: every live key's current state published again through the outbox.

What Debezium calls a snapshot, for bootstrapping a new consumer, rebuilding a topic after
retention, or a broker that starts empty (`make dev`). For each key of an entity that has a
row, one outbox row with:
- the key's *current* sequence (`event_sequences`, not bumped): a consumer that already
  applied it skips the event as not newer (the views, the cache and the inbox compare
  sequences), one that has not gets the key's full state, so views rebuild to the same state;
- an event id derived from (entity, key, sequence): two snapshots of an unchanged key publish
  the same event, and an inbox that took it once skips it by id as well;
- op `create` (a consumer that never saw the key learns it from here, as Debezium's `r`);
  `read` is taken by access events, which consumers do not sequence.
A deleted key has no row, so nothing is published for it: it stays deleted everywhere.

Sequence and state are read by one statement, so from one MVCC snapshot: a writer's commit
updates both at once (the capture trigger), so they always agree. A write committed while a
snapshot runs gets a higher sequence and its own event; whichever the relay publishes first,
consumers end with the newer state. Keys go in primary-key order, `CHUNK` per transaction, so
a large table neither holds one long transaction nor one huge outbox batch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.capture.model import EventedBase
from app.capture.ownership import owner_of
from app.capture.plans import plan_for, sql_identifier, sql_literal, state_sql

#: Keys per transaction.
CHUNK = 2000


@dataclass(frozen=True)
class SnapshotPlan:
    """The statements snapshotting one root entity."""

    entity: str
    keys_sql: str     # the next chunk of keys after $1 (NULL: from the start), $2 of them
    insert_sql: str   # their outbox rows ($1: the keys as text); returns how many
    count_sql: str    # the keys a snapshot would publish (for --dry-run)


def plan(root: type[EventedBase]) -> SnapshotPlan:
    """The snapshot statements of root model `root` (its extensions nested in its state)."""
    p = plan_for(root)
    entity = p.root_entity
    # Names from code, checked as the capture triggers check them before they go into SQL.
    key, table = sql_identifier(p.key_column.name), sql_identifier(p.table.name)
    literal, topic, owner = sql_literal(entity), sql_literal(p.schema.topic), sql_literal(owner_of(root))
    keys_sql = (f'SELECT "{key}" AS k, "{key}"::text AS t FROM "{table}" '
                f'WHERE $1::text IS NULL OR "{key}" > '
                f'CAST($1 AS {p.key_sql_type}) '
                f'ORDER BY "{key}" LIMIT $2')
    insert_sql = f"""
WITH inserted AS (
  INSERT INTO outbox (topic, entity, schema_version, key, event_id, op, service, sequence, data)
  SELECT {topic}, {literal}, {int(p.version)}, q.key,
         md5({literal} || ':' || q.key || ':' || q.seq)::uuid, 'create', {owner}, q.seq, st.state
  FROM event_sequences q, LATERAL (SELECT {state_sql(root, "q.key")} AS state) st
  WHERE q.entity = {literal} AND q.key = ANY($1::text[]) AND st.state IS NOT NULL
  ORDER BY q.key
  RETURNING 1)
SELECT count(*) FROM inserted"""
    count_sql = (f'SELECT count(*) FROM "{table}" r JOIN event_sequences q '
                 f"ON q.entity = {literal} AND q.key = r.\"{key}\"::text")
    return SnapshotPlan(entity, keys_sql, insert_sql, count_sql)


@dataclass
class SnapshotResult:
    """What a snapshot of one entity did."""

    entity: str
    published: int = 0
    rows: int = 0  # rows seen; rows - published had no sequence (never written through capture)


async def snapshot_entity(conn: asyncpg.Connection, root: type[EventedBase],
                          progress: Callable[[SnapshotResult], Any] = lambda r: None) -> SnapshotResult:
    """Publish every live key of `root` through the outbox, `CHUNK` keys per transaction."""
    statements = plan(root)
    result = SnapshotResult(statements.entity)
    after: str | None = None
    while True:
        async with conn.transaction():
            chunk = await conn.fetch(statements.keys_sql, after, CHUNK)
            if not chunk:
                return result
            result.published += await conn.fetchval(statements.insert_sql, [r["t"] for r in chunk])
        result.rows += len(chunk)
        after = chunk[-1]["t"]
        progress(result)


async def count_entity(conn: asyncpg.Connection, root: type[EventedBase]) -> int:
    """How many events a snapshot of `root` would publish now."""
    return int(await conn.fetchval(plan(root).count_sql))
