"""Only the owner service writes an entity or reads its sensitive columns, however it asks."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import undefer

from app.orm import Database, OwnershipError
from app.settings import Settings
from models import Customer


@pytest.fixture
async def owner(settings: Settings, schema: None) -> AsyncIterator[Database]:
    db = Database(settings.database_url, service="customers")
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
