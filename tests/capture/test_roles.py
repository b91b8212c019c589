"""PostgreSQL enforces ownership: a non-owner service, connected as its role, gets nothing.

The attacker is service `orders` inside its own process, using every ordinary API to read a
customer's email (owned by `customers`) or to write customers. Each attempt runs twice: with
the library's SQL filter on (an early, named error) and off (PostgreSQL's privileges alone
refuse it, with a permission error).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import DDL, delete, func, insert, literal_column, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from app.capture.ownership import UneventedWrite
from app.capture.roles import WORKER, role_name, service_url
from app.orm import Database, OwnershipError
from app.settings import Settings
from models import Customer, Order

#: PostgreSQL's insufficient_privilege: missing grants and row-level security violations.
INSUFFICIENT_PRIVILEGE = "42501"

Attempt = Callable[[AsyncSession, int], Awaitable[Any]]


def role_url(settings: Settings, service: str) -> str:
    return service_url(settings.database_url, role_name(settings.db_role_prefix, service))


def sqlstate(err: BaseException) -> str | None:
    orig = getattr(err, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


@pytest.fixture
async def canary(settings: Settings, schema: None) -> AsyncIterator[tuple[int, str]]:
    """A customer written by its owner, connected as the owner's role; its email is the canary."""
    owner = Database(role_url(settings, "customers"), service="customers", record_reads=False)
    email = f"canary-{uuid.uuid4().hex}@example.com"
    async with owner.session() as s:
        c = Customer(name="Canary", email=email)
        s.add(c)
    yield c.id, email
    await owner.close()


@pytest.fixture(params=[True, False], ids=["filter_on", "filter_off"])
async def attacker(request: pytest.FixtureRequest, settings: Settings, schema: None) -> AsyncIterator[Database]:
    """Service `orders` connected as its own role, with the library's SQL filter on or off."""
    db = Database(role_url(settings, "orders"), service="orders", record_reads=False,
                  sql_filter=request.param)
    yield db
    await db.close()


def _sql(statement: str) -> Attempt:
    if ":id" in statement:
        return lambda s, cid: s.execute(text(statement), {"id": cid})
    return lambda s, cid: s.execute(text(statement))


async def _set_role_to_owner(s: AsyncSession, cid: int) -> Any:
    own_role = s.bind.url.username  # type: ignore[union-attr]
    return await s.execute(text(f"SET ROLE {own_role.removesuffix('orders')}customers"))


async def _driver_sql(s: AsyncSession, cid: int) -> Any:
    conn = await s.connection()
    return await conn.exec_driver_sql("SELECT * FROM customers")


async def _ddl(statement: str, s: AsyncSession) -> Any:
    conn = await s.connection()
    return await conn.execute(DDL(statement))


async def _temp_view(s: AsyncSession) -> Any:
    # Creating it succeeds (PostgreSQL checks a view's privileges when it is read, as its
    # owner, the attacker); reading it is what must fail.
    await s.execute(text("CREATE TEMP VIEW leak AS SELECT * FROM customers"))
    return await s.execute(text("SELECT * FROM leak"))


async def _temp_trigger(s: AsyncSession, cid: int) -> Any:
    # A function in the session's temporary schema needs no CREATE on `public`; the trigger
    # on the owner's table would copy each later write of the owner into the attacker's hands.
    await s.execute(text("CREATE FUNCTION pg_temp.leak() RETURNS trigger LANGUAGE plpgsql AS "
                         "$$ BEGIN RAISE NOTICE '%', to_jsonb(NEW); RETURN NEW; END $$"))
    return await s.execute(text("CREATE TRIGGER leak AFTER INSERT OR UPDATE ON customers "
                                "FOR EACH ROW EXECUTE FUNCTION pg_temp.leak()"))


async def _capture_trigger_on_own_table(s: AsyncSession, cid: int) -> Any:
    # The capture functions run as the schema's owner (SECURITY DEFINER): attached to a table
    # of the attacker's, one would raise customers events in the owner's name.
    await s.execute(text("CREATE TEMP TABLE decoy (id bigint)"))
    await s.execute(text("CREATE TRIGGER decoy AFTER INSERT ON decoy FOR EACH ROW "
                         "EXECUTE FUNCTION public.mse_capture_customers()"))
    return await s.execute(text("INSERT INTO decoy VALUES (:id)"), {"id": cid})


READS: dict[str, Attempt] = {
    "text_star": _sql("SELECT * FROM customers WHERE id = :id"),
    "select_text_star": lambda s, cid: s.execute(select(text("*")).select_from(Customer)),
    "literal_column_star": lambda s, cid: s.execute(
        select(literal_column("*")).select_from(Customer.__table__)),
    "row_to_json": lambda s, cid: s.execute(select(func.row_to_json(Customer.__table__.table_valued()))),
    "exec_driver_sql_star": _driver_sql,
    "row_cast_oracle": _sql("SELECT c::text LIKE '%canary%' FROM customers c WHERE id = :id"),
    "upper_case_column": _sql("SELECT EMAIL FROM customers WHERE id = :id"),
    "unicode_escape": _sql('SELECT U&"\\0065mail" FROM customers WHERE id = :id'),
    "orm_column": lambda s, cid: s.execute(select(Customer.email).where(Customer.id == cid)),
    "undefer": lambda s, cid: s.execute(
        select(Customer).options(undefer(Customer.email)).where(Customer.id == cid)),
    "query_to_xml": _sql("SELECT query_to_xml('SELECT em' || 'ail FROM cust' || 'omers', true, false, '')"),
    "copy_to_file": _sql("COPY (SELECT * FROM customers) TO '/tmp/mse-leak.csv'"),
    "view": lambda s, cid: _ddl("CREATE VIEW leak AS SELECT email FROM customers", s),
    "temp_view": lambda s, cid: _temp_view(s),
    "trigger": _temp_trigger,
    "read_outbox": _sql("SELECT data FROM outbox"),
    "set_role_to_owner": _set_role_to_owner,
}

WRITES: dict[str, Attempt] = {
    "text_update": _sql("UPDATE customers SET name = 'Mallory' WHERE id = :id"),
    "text_update_upper_case": _sql("UPDATE customers SET EMAIL = 'x@evil' WHERE id = :id"),
    "text_delete": _sql("DELETE FROM customers WHERE id = :id"),
    "text_insert": _sql("INSERT INTO customers (name, email) VALUES ('Eve', 'eve@evil')"),
    "core_update_returning_star": lambda s, cid: s.execute(
        update(Customer.__table__).where(Customer.__table__.c.id == cid).values(name="x")
        .returning(literal_column("*"))),
    "core_delete": lambda s, cid: s.execute(delete(Customer.__table__).where(Customer.__table__.c.id == cid)),
    "core_insert": lambda s, cid: s.execute(insert(Customer.__table__).values(name="Eve", email="e@evil")),
    "ddl_update": lambda s, cid: _ddl("UPDATE customers SET email = 'x@evil'", s),
    "truncate": _sql("TRUNCATE customers"),
    "forged_event": _sql(
        "INSERT INTO outbox (topic, entity, schema_version, key, op, service, sequence, data) "
        "VALUES ('customers-v1', 'customers', 1, '1', 'update', 'customers', 999, '{}')"),
    "forged_event_in_own_name": _sql(
        "INSERT INTO outbox (topic, entity, schema_version, key, op, service, sequence, data) "
        "VALUES ('customers-v1', 'customers', 1, '1', 'update', 'orders', 999, '{}')"),
    "forged_event_through_the_capture_trigger": _capture_trigger_on_own_table,
}


async def _attempt(db: Database, how: Attempt, cid: int) -> BaseException:
    with pytest.raises((DBAPIError, PermissionError)) as err:
        async with db.session() as s:
            await how(s, cid)
    return err.value


def _assert_refused(err: BaseException, filtered: bool) -> None:
    if filtered and isinstance(err, (OwnershipError, UneventedWrite)):
        assert "customers" in str(err)  # the early error names what was refused
        return
    # The filter is off, or the form is one it does not recognise: the database refused.
    assert isinstance(err, DBAPIError), err
    # "permission denied for table …", "… violates row-level security policy", "must be
    # superuser or have privileges of pg_write_server_files …": all insufficient_privilege.
    assert sqlstate(err) == INSUFFICIENT_PRIVILEGE, err


@pytest.mark.parametrize("how", READS)
async def test_non_owner_role_cannot_read_the_sensitive_column_by_any_form(
        attacker: Database, canary: tuple[int, str], how: str, request: pytest.FixtureRequest) -> None:
    cid, _ = canary
    err = await _attempt(attacker, READS[how], cid)
    _assert_refused(err, filtered=request.node.callspec.params["attacker"])


@pytest.mark.parametrize("how", WRITES)
async def test_non_owner_role_cannot_write_the_entity_nor_forge_its_events(
        attacker: Database, canary: tuple[int, str], how: str, request: pytest.FixtureRequest,
        settings: Settings) -> None:
    cid, email = canary
    err = await _attempt(attacker, WRITES[how], cid)
    _assert_refused(err, filtered=request.node.callspec.params["attacker"])
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        row = await conn.fetchrow("SELECT name, email FROM customers WHERE id = $1", cid)
        forged = await conn.fetchval("SELECT count(*) FROM outbox WHERE sequence = 999")
        # Only the canary's own create: no event of the key was raised since.
        sequence = await conn.fetchval(
            "SELECT seq FROM event_sequences WHERE entity = 'customers' AND key = $1", str(cid))
    finally:
        await conn.close()
    assert (row["name"], row["email"]) == ("Canary", email) and forged == 0 and sequence == 1


async def test_owner_writing_raw_sql_on_a_plain_driver_connection_still_raises_its_event(
        canary: tuple[int, str], settings: Settings) -> None:
    cid, email = canary
    # No library at all: asyncpg with the owner's credentials, as a script or a psql session.
    conn = await asyncpg.connect(service_url(settings.asyncpg_dsn, role_name(settings.db_role_prefix, "customers")))
    try:
        async with conn.transaction():
            await conn.execute("UPDATE customers SET name = 'Raw I' WHERE id = $1", cid)
            await conn.execute("UPDATE customers SET name = 'Raw II' WHERE id = $1", cid)
        await conn.execute("DELETE FROM customers WHERE id = $1", cid)
    finally:
        await conn.close()
    admin = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        rows = await admin.fetch("SELECT op, sequence, service, data::text AS data FROM outbox "
                                 "WHERE entity = 'customers' AND key = $1 ORDER BY id", str(cid))
    finally:
        await admin.close()
    # One event per transaction, carrying the state it committed, in the owner's name; the
    # sensitive column stays out of it as it does for ORM writes.
    assert [(r["op"], r["sequence"], r["service"]) for r in rows] == [
        ("create", 1, "customers"), ("update", 2, "customers"), ("delete", 3, "customers")]
    assert json.loads(rows[1]["data"])["name"] == "Raw II" and email not in rows[1]["data"]
    assert rows[2]["data"] is None


async def test_pg_stats_hides_the_sensitive_column_from_non_owners(
        attacker: Database, canary: tuple[int, str], settings: Settings) -> None:
    admin = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        await admin.execute("ANALYZE customers")  # statistics exist, holding sample emails
        assert await admin.fetchval(
            "SELECT count(*) FROM pg_stats WHERE tablename = 'customers' AND attname = 'email'") == 1
    finally:
        await admin.close()
    async with attacker.session() as s:
        # ANALYZE by a non-owner is skipped with a warning; pg_stats shows only granted columns.
        await s.execute(text("ANALYZE customers"))
        seen = (await s.execute(text(
            "SELECT attname FROM pg_stats WHERE tablename = 'customers'"))).scalars().all()
    assert "email" not in seen and "name" in seen


async def test_non_owner_cannot_bump_another_entitys_sequences(
        attacker: Database, canary: tuple[int, str], settings: Settings) -> None:
    cid, _ = canary
    async with attacker.session() as s:
        bumped = await s.execute(text(
            "UPDATE event_sequences SET seq = seq + 1000 WHERE entity = 'customers'"))
        # Row-level security: the owner's rows are invisible to this role, so none is touched.
        assert bumped.rowcount == 0


async def test_owner_and_non_owner_roles_do_their_own_work(
        canary: tuple[int, str], settings: Settings) -> None:
    cid, email = canary
    owner = Database(role_url(settings, "customers"), service="customers", record_reads=False,
                     sql_filter=False)
    orders = Database(role_url(settings, "orders"), service="orders", sql_filter=False)
    try:
        async with owner.session() as s:
            assert (await s.execute(text("SELECT email FROM customers WHERE id = :id"),
                                    {"id": cid})).scalar_one() == email
            c = await s.get_one(Customer, cid)
            c.name = "Canary II"
        async with orders.session() as s:
            # Public columns of another's entity (and the access event of that read), own writes.
            assert (await s.get_one(Customer, cid)).name == "Canary II"
            o = Order(customer_id=cid, amount_cents=100, currency="EUR")
            s.add(o)
        await orders.access.flush()  # type: ignore[union-attr]
    finally:
        await owner.close()
        await orders.close()
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        rows = await conn.fetch("SELECT topic, service, key, data::text AS data FROM outbox "
                                "WHERE (entity = 'customers' AND key = $1) OR (entity = 'orders' AND key = $2) "
                                "OR (topic = 'access-v1' AND service = 'orders')", str(cid), str(o.id))
    finally:
        await conn.close()
    seen = {(r["topic"], r["service"]) for r in rows}
    assert {("customers-v1", "customers"), ("orders-v2", "orders"), ("access-v1", "orders")} <= seen
    assert not any(email in (r["data"] or "") for r in rows)


async def test_worker_role_relays_the_outbox_but_reads_no_sensitive_column(
        canary: tuple[int, str], settings: Settings) -> None:
    conn = await asyncpg.connect(service_url(settings.asyncpg_dsn, role_name(settings.db_role_prefix, WORKER)))
    try:
        await conn.fetch("SELECT id, data FROM outbox ORDER BY id LIMIT 10")
        await conn.execute("DELETE FROM outbox WHERE id = -1")
        assert await conn.fetchval("SELECT name FROM customers WHERE id = $1", canary[0]) == "Canary"
        # The cache's database fallback loads a key's state with its sequence (app/cache.py).
        assert await conn.fetchval("SELECT seq FROM event_sequences WHERE entity = 'customers' AND key = $1",
                                   str(canary[0])) == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE event_sequences SET seq = seq + 1 WHERE entity = 'customers'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT email FROM customers WHERE id = $1", canary[0])
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE orders SET status = 'paid'")
    finally:
        await conn.close()


async def test_another_service_can_neither_see_nor_forge_the_billing_inbox(
        attacker: Database, settings: Settings) -> None:
    billing = Database(role_url(settings, "billing"), service="billing", record_reads=False, sql_filter=False)
    event_id = str(uuid.uuid4())
    try:
        async with billing.session() as s:  # billing marks an event applied, as its inbox does
            await s.execute(text("INSERT INTO inbox (consumer, event_id, topic, partition, \"offset\") "
                                 "VALUES ('billing', :id, 'orders-v2', 0, 1)"), {"id": event_id})
            await s.execute(text("INSERT INTO inbox_keys (consumer, entity, key, sequence) "
                                 "VALUES ('billing', 'orders', :key, 5) ON CONFLICT DO NOTHING"),
                            {"key": event_id})
    finally:
        await billing.close()
    async with attacker.session() as s:
        # Row-level security: billing's rows are invisible to orders, so none is changed.
        assert (await s.execute(text("SELECT count(*) FROM inbox WHERE consumer = 'billing'"))).scalar_one() == 0
        wiped = await s.execute(text("UPDATE inbox_keys SET sequence = 0 WHERE consumer = 'billing'"))
        assert wiped.rowcount == 0
    # Nor can it mark an event as applied by billing, so billing would skip it.
    with pytest.raises(DBAPIError) as refused:
        async with attacker.session() as s:
            await s.execute(text("INSERT INTO inbox (consumer, event_id, topic, partition, \"offset\") "
                                 "VALUES ('billing', :id, 'orders-v2', 0, 2)"), {"id": str(uuid.uuid4())})
    assert sqlstate(refused.value) == INSUFFICIENT_PRIVILEGE
    # Its own consumers' rows it may write.
    async with attacker.session() as s:
        await s.execute(text("INSERT INTO inbox (consumer, event_id, topic, partition, \"offset\") "
                             "VALUES ('orders.audit', :id, 'orders-v2', 0, 3)"), {"id": str(uuid.uuid4())})
