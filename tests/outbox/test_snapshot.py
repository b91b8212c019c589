"""`python -m app snapshot`: every live key's current state through the outbox, at its current
sequence, with an event id of (entity, key, sequence): idempotent, skipped by consumers that are
up to date, enough for one that is not, and silent about deleted keys."""
from __future__ import annotations

import hashlib
import uuid
from typing import Any

import asyncpg
import pytest

from app.cli.preflight import StartupError
from app.cli.snapshot import run_snapshot
from app.orm import Database
from app.outbox.relay import Relay
from app.settings import Settings
from app.views import apply_event, plain_state
from models import Order, OrderShipping
from tests.kafka import TopicReader


async def write_orders(db: Database) -> tuple[str, str, str]:
    """Order `kept` (created, then paid, with shipping), `plain` (created) and `gone` (deleted)."""
    async with db.session() as s:
        kept, plain, gone = (Order(customer_id=71, amount_cents=c, currency="EUR") for c in (500, 20, 9))
        s.add_all([kept, plain, gone])
    async with db.session() as s:
        order = await s.get_one(Order, kept.id)
        order.status = "paid"
        order.shipping = OrderShipping(address="1 Quay", carrier="DHL")
        await s.delete(await s.get_one(Order, gone.id))
    return str(kept.id), str(plain.id), str(gone.id)


async def as_owner(settings: Settings, sql: str, keys: set[str]) -> list[asyncpg.Record]:
    """`sql` with the keys as $1, as the tables' owner: no service role may read the outbox."""
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        return await conn.fetch(sql, list(keys))
    finally:
        await conn.close()


async def outbox_rows(settings: Settings, keys: set[str]) -> list[dict[str, Any]]:
    """The outbox rows of `keys`, in outbox order."""
    return [dict(r) for r in await as_owner(
        settings, "SELECT key, event_id::text, op, service, sequence, data::text FROM outbox "
                  "WHERE entity = 'orders' AND key = ANY($1::text[]) ORDER BY id", keys)]


async def sequences(settings: Settings, keys: set[str]) -> dict[str, int]:
    return {r["key"]: r["seq"] for r in await as_owner(
        settings, "SELECT key, seq FROM event_sequences WHERE entity = 'orders' AND key = ANY($1::text[])", keys)}


async def test_a_snapshot_writes_each_live_key_once_at_its_sequence_and_again_identically(
        settings: Settings, db: Database) -> None:
    kept, plain, gone = await write_orders(db)
    keys = {kept, plain, gone}
    # The writes' own events: not what is tested here.
    await as_owner(settings, "DELETE FROM outbox WHERE key = ANY($1::text[])", keys)
    before = await sequences(settings, keys)
    assert before == {kept: 2, plain: 1, gone: 2}
    [result] = await run_snapshot(settings, ["orders"], dry_run=False)
    assert result.entity == "orders" and result.published >= 2
    first = await outbox_rows(settings, keys)
    # The deleted key has no row: nothing is published for it.
    assert [(r["key"], r["op"], r["service"], r["sequence"]) for r in first] == [
        (key, "create", "orders", before[key]) for key in sorted((kept, plain))]
    expected_id = str(uuid.UUID(hashlib.md5(f"orders:{kept}:2".encode()).hexdigest()))
    assert {r["key"]: r["event_id"] for r in first}[kept] == expected_id
    assert await sequences(settings, keys) == before  # not bumped
    await run_snapshot(settings, ["orders"], dry_run=False)
    second = (await outbox_rows(settings, keys))[len(first):]
    assert [(r["key"], r["event_id"], r["sequence"], r["data"]) for r in second] == [
        (r["key"], r["event_id"], r["sequence"], r["data"]) for r in first]


async def test_up_to_date_consumers_skip_the_snapshot_and_a_new_one_rebuilds_the_same_state(
        settings: Settings, db: Database, relay: Relay) -> None:
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        kept, plain, gone = await write_orders(db)
        keys = {kept, plain, gone}
        # The writes' events: 2 of kept, 1 of plain, 2 of gone.
        await reader.wait_for(lambda ms: len([m for m in ms if m.key in keys]) >= 5, 30)
        published = len(reader.for_keys(keys))
        await run_snapshot(settings, ["orders"], dry_run=False)
        await reader.wait_for(lambda ms: len([m for m in ms if m.key in keys]) >= published + 2, 30)
        history, snapshot = reader.for_keys(keys)[:published], reader.for_keys(keys)[published:]

    def consume(table: dict[str, Any], messages: list[Any]) -> int:
        """Apply as every view does (newer sequence only); how many changed the table."""
        changed = 0
        for m in messages:
            applied = apply_event(m.key, table.get(m.key), m.record["sequence"], plain_state(m.record["data"]),
                                  m.partition)
            if applied is not None:
                table[m.key], changed = applied[0], changed + 1
        return changed

    up_to_date: dict[str, Any] = {}
    consume(up_to_date, history)
    assert consume(up_to_date, snapshot) == 0  # every snapshot event is not newer: skipped
    fresh: dict[str, Any] = {}
    assert consume(fresh, snapshot) == 2
    assert {k: (v["seq"], v["state"]) for k, v in fresh.items()} == {
        k: (v["seq"], v["state"]) for k, v in up_to_date.items() if v["state"] is not None}
    assert gone not in fresh and fresh[kept]["state"]["shipping"]["carrier"] == "DHL"


async def test_dry_run_counts_and_an_unknown_entity_is_refused_in_one_line(
        settings: Settings, db: Database) -> None:
    async with db.session() as s:
        s.add(Order(customer_id=72, amount_cents=1, currency="EUR"))
    [counted] = await run_snapshot(settings, ["orders"], dry_run=True)
    assert counted.published >= 1
    with pytest.raises(StartupError, match="snapshot: no entity 'order'; entities: customers, invoices, orders"):
        await run_snapshot(settings, ["order"], dry_run=False)
