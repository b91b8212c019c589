"""Customer: owned by the customers service; its email is sensitive and never enters events."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.orm import EventedBase, sensitive_column


class Customer(EventedBase):
    """A customer of the shop."""

    __tablename__ = "customers"
    __entity__ = "customers"
    __owner__ = "customers"
    __schema_version__ = 1

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    # Read by other services only from the customers service, over HTTP (app/web/owner.py).
    email: Mapped[str] = sensitive_column(String(320), readers=("orders", "support"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=func.now())
