"""Invoice: owned by the billing service, which keeps one per paid order from the orders events."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.orm import EventedBase


class Invoice(EventedBase):
    """The invoice of one paid (or shipped) order: its amount and currency as last paid."""

    __tablename__ = "invoices"
    __entity__ = "invoices"
    __owner__ = "billing"
    __schema_version__ = 1

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # Deliberately not unique: one invoice per order is what the inbox's exactly-once delivery
    # must keep true, and the chaos checker counts doubles instead of a constraint hiding them.
    # No FK: orders belong to another service and may live in another database.
    order_id: Mapped[int] = mapped_column(BigInteger, index=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=func.now())
