"""A demo service: writes customers and orders through the ORM, moving orders through statuses."""
from __future__ import annotations

import asyncio
import random

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from app.orm import Database
from app.schema import create_all
from app.settings import Settings
from models import Customer, Order, OrderShipping

CURRENCIES = ("EUR", "USD", "GBP")
NEXT_STATUS = {"pending": "paid", "paid": "shipped"}


async def write_one(db: Database, customers_db: Database, rng: random.Random,
                    customer_ids: list[int]) -> None:
    """One business step: a new order (sometimes with shipping), or an order moving on."""
    if not customer_ids or rng.random() < 0.05:
        # Customers belong to the customers service: it writes them, with their email.
        async with customers_db.session() as s:
            customer = Customer(name=f"customer {rng.randrange(10**6)}",
                                email=f"c{rng.randrange(10**9)}@example.com")
            s.add(customer)
        customer_ids.append(customer.id)
    async with db.session() as s:
        roll = rng.random()
        if roll < 0.5:
            order = Order(customer_id=rng.choice(customer_ids), amount_cents=rng.randrange(100, 50_000),
                          currency=rng.choice(CURRENCIES))
            if rng.random() < 0.5:
                order.shipping = OrderShipping(address=f"{rng.randrange(1, 200)} Main St", carrier="DHL")
            s.add(order)
        else:
            moving = (await s.execute(
                select(Order).where(Order.status.in_(NEXT_STATUS)).order_by(Order.id.desc()).limit(1)
            )).scalar_one_or_none()
            if moving is not None:
                moving.status = "cancelled" if rng.random() < 0.1 else NEXT_STATUS[moving.status]


async def run_demo(settings: Settings, *, rate: float, count: int = 0) -> None:
    """Write at `rate` per second until `count` writes (0: forever)."""
    if not settings.service_database_urls:
        # Everything runs as DATABASE_URL's role: it may create what is missing itself.
        # With roles, the tables belong to the admin that ran `init-db` (services may not
        # create tables, by design).
        admin = create_async_engine(settings.database_url)
        try:
            await create_all(admin)
        finally:
            await admin.dispose()
    db = Database(settings.database_url_for("orders"), service="orders")
    customers_db = Database(settings.database_url_for("customers"), service="customers")
    rng = random.Random()
    customer_ids: list[int] = []
    written = 0
    try:
        while count == 0 or written < count:
            await write_one(db, customers_db, rng, customer_ids)
            written += 1
            await asyncio.sleep(1 / rate)
    finally:
        await db.close()
        await customers_db.close()
