"""Only the owner service writes an entity or reads its sensitive columns, however it asks."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import DDL, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from app.capture import ownership
from app.capture.ownership import UneventedWrite
from app.orm import Database, EventedBase, OwnershipError
from app.settings import Settings
from models import Customer


@pytest.fixture
async def owner(settings: Settings, schema: None) -> AsyncIterator[Database]:
    db = Database(settings.database_url_for("customers"), service="customers")
    yield db
    await db.close()


@pytest.fixture
async def customer_id(owner: Database) -> int:
    async with owner.session() as s:
        c = Customer(name="Grace", email=f"grace-{uuid.uuid4().hex}@example.com")
        s.add(c)
    return c.id


def assert_names(err: pytest.ExceptionInfo[OwnershipError], column: str) -> None:
    message = str(err.value)
    assert "customers" in message and f".{column}" in message and "'customers'" in message
    assert err.value.owner == "customers" and err.value.service == "orders"


async def test_non_owner_cannot_write_the_entity(db: Database) -> None:
    with pytest.raises(OwnershipError) as err:
        async with db.session() as s:
            s.add(Customer(name="Eve", email="eve@example.com"))
    assert_names(err, "*")


async def test_non_owner_cannot_bulk_update(db: Database, customer_id: int) -> None:
    with pytest.raises(OwnershipError):
        async with db.session() as s:
            await s.execute(update(Customer).where(Customer.id == customer_id).values(name="x"))


async def test_non_owner_cannot_update_a_loaded_entity(db: Database, customer_id: int) -> None:
    with pytest.raises(OwnershipError):
        async with db.session() as s:
            c = await s.get_one(Customer, customer_id)
            c.name = "Mallory"


async def test_non_owner_reads_public_columns_but_not_sensitive_attribute(db: Database, customer_id: int) -> None:
    async with db.session() as s:
        c = await s.get_one(Customer, customer_id)
        assert c.name == "Grace"
        with pytest.raises(OwnershipError) as err:
            _ = c.email
    assert_names(err, "email")


@pytest.mark.parametrize("how", ["select_column", "undefer", "text", "text_star", "bulk_returning"])
async def test_non_owner_sensitive_read_bypasses_are_refused(db: Database, customer_id: int, how: str) -> None:
    statements = {
        "select_column": select(Customer.email).where(Customer.id == customer_id),
        "undefer": select(Customer).options(undefer(Customer.email)).where(Customer.id == customer_id),
        "text": text("SELECT email FROM customers WHERE id = :id").bindparams(id=customer_id),
        "text_star": text('SELECT c."email" FROM "customers" c WHERE c.id = :id').bindparams(id=customer_id),
        "bulk_returning": update(Customer).where(Customer.id == customer_id).values(name="x")
        .returning(Customer.email),
    }
    with pytest.raises(OwnershipError):
        async with db.session() as s:
            await s.execute(statements[how])


async def test_owner_is_unaffected(owner: Database, customer_id: int) -> None:
    async with owner.session() as s:
        c = await s.get_one(Customer, customer_id)
        assert c.email.startswith("grace-")
        assert (await s.execute(select(Customer.email).where(Customer.id == customer_id))).scalar_one() == c.email
        raw = (await s.execute(text("SELECT email FROM customers WHERE id = :id"),
                               {"id": customer_id})).scalar_one()
        assert raw == c.email
        await s.execute(update(Customer).where(Customer.id == customer_id).values(name="Grace H."))
    async with owner.session() as s:
        assert (await s.get_one(Customer, customer_id)).name == "Grace H."


async def _driver_delete(s: AsyncSession, cid: int) -> object:
    conn = await s.connection()
    return await conn.exec_driver_sql(f"DELETE FROM customers WHERE id = {cid}")


async def _ddl_update(s: AsyncSession, cid: int) -> object:
    conn = await s.connection()
    return await conn.execute(DDL(f"UPDATE customers SET name = 'DDL' WHERE id = {cid}"))


UNEVENTED_WRITES = {
    "text_update": lambda s, cid: s.execute(text("UPDATE customers SET name = 'x' WHERE id = :id"), {"id": cid}),
    "text_quoted_upper": lambda s, cid: s.execute(text(f'update PUBLIC."customers" SET name = \'x\' WHERE id = {cid}')),
    "cte_delete": lambda s, cid: s.execute(text(
        "WITH gone AS (DELETE FROM customers WHERE id = :id RETURNING id) SELECT count(*) FROM gone"), {"id": cid}),
    "core_update": lambda s, cid: s.execute(
        update(Customer.__table__).where(Customer.__table__.c.id == cid).values(name="x")),
    "exec_driver_sql": _driver_delete,
    "ddl": _ddl_update,
}


@pytest.mark.parametrize("how", UNEVENTED_WRITES)
async def test_owner_write_that_would_raise_no_event_is_refused_naming_the_orm(
        owner: Database, worker_db: Database, customer_id: int, how: str) -> None:
    async with worker_db.engine.begin() as conn:  # the relay's role: the one that reads the outbox
        await conn.execute(text("DELETE FROM outbox"))
    with pytest.raises(UneventedWrite) as err:
        async with owner.session() as s:
            await UNEVENTED_WRITES[how](s, customer_id)
    assert "'customers'" in str(err.value) and "through the ORM" in str(err.value)
    async with owner.session() as s:
        assert (await s.get_one(Customer, customer_id)).name == "Grace"
    async with worker_db.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one() == 0


async def test_merge_without_load_writes_and_raises_the_event(owner: Database, worker_db: Database,
                                                              customer_id: int) -> None:
    async with owner.session() as s:
        detached = await s.get_one(Customer, customer_id)  # e.g. an object kept from a cache
    async with worker_db.engine.begin() as conn:
        await conn.execute(text("DELETE FROM outbox"))
    async with owner.session() as s:
        merged = await s.merge(detached, load=False)  # no SELECT: `load` fires without a row
        merged.name = "Grace M."
    async with owner.session() as s:
        assert (await s.get_one(Customer, customer_id)).name == "Grace M."
    async with worker_db.engine.connect() as conn:
        ops = (await conn.execute(text("SELECT op FROM outbox WHERE entity = 'customers' AND key = :k"),
                                  {"k": str(customer_id)})).scalars().all()
    assert ops == ["update"]


@pytest.mark.parametrize("sql", [
    "SELECT EMAIL FROM customers", 'SELECT U&"\\0065mail" FROM customers', 'SELECT "email" FROM "CUSTOMERS"',
    "SELECT * FROM customers", "SELECT c.* FROM customers c", "SELECT id, * FROM customers",
    "SELECT row_to_json(c) FROM customers c", "SELECT to_jsonb(customers) FROM customers",
])
def test_sql_filter_folds_identifiers_and_sees_whole_row_reads(sql: str) -> None:
    foreign = ownership.foreign_sensitive(EventedBase, "orders")
    with pytest.raises(OwnershipError):
        ownership.check_sql("orders", foreign, sql)


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM customers", "SELECT id, name FROM customers", "SELECT * FROM orders",
])
def test_sql_filter_lets_public_reads_pass(sql: str) -> None:
    ownership.check_sql("orders", ownership.foreign_sensitive(EventedBase, "orders"), sql)
