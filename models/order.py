"""Order, the aggregate root of `orders`, and OrderShipping, its one-to-one extension."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, String, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.aggregations import count_by, sum_by, window_count
from app.orm import EventedBase
from app.wire.convert import ConversionError, Data, converter

STATUSES = ("pending", "paid", "shipped", "cancelled")
#: v1 carries the amount as a double: beyond this many cents it would silently change.
MAX_EXACT_CENTS = 2**53

#: Per customer: how many orders, their totals per currency, the time of the latest.
CUSTOMER_ORDERS = sum_by("customer_orders", key="customer_id", sums={"total_cents": "amount_cents"},
                         split_by="currency", latest={"last_order_at": "created_at"})
#: How many orders are in each status now.
ORDERS_BY_STATUS = count_by("orders_by_status", "status")
#: How many orders were created in each minute of the last hour.
ORDERS_PER_MINUTE = window_count("orders_per_minute", time="created_at", size=60, keep=3600)


class Order(EventedBase):
    """An order of a customer; events go to `orders-v2` (and v1 for legacy readers)."""

    __tablename__ = "orders"
    __entity__ = "orders"
    __owner__ = "orders"
    __schema_version__ = 2
    # How older versions are served: "dual-publish" (the relay writes both topics) or
    # "downconvert" (the worker's down-conversion agent derives v1 from v2).
    __legacy__ = {1: "downconvert"}
    # The worker's tables derived from the orders' events, beside `orders` (`/tables/<name>/`).
    __aggregations__ = (CUSTOMER_ORDERS, ORDERS_BY_STATUS, ORDERS_PER_MINUTE)
    __table_args__ = (CheckConstraint(f"status IN {STATUSES!r}", name="orders_status_valid"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # No FK to customers: customers belong to another service and may live in another database.
    customer_id: Mapped[int] = mapped_column(BigInteger, index=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=func.now(), onupdate=func.now()
    )

    shipping: Mapped["OrderShipping | None"] = relationship(
        back_populates="order", uselist=False, cascade="all, delete-orphan", passive_deletes=True
    )


class OrderShipping(EventedBase):
    """Shipping details of an order: an extension, so its writes raise the order's events."""

    __tablename__ = "order_shipping"
    __extends__ = Order
    __extension_field__ = "shipping"

    order_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True
    )
    address: Mapped[str] = mapped_column(String(500))
    carrier: Mapped[str] = mapped_column(String(100))
    tracking_number: Mapped[str | None] = mapped_column(String(100), nullable=True)

    order: Mapped[Order] = relationship(back_populates="shipping")


@converter("orders", 2, 1, produces={"amount", "status", "shipping_address"})
def orders_v2_to_v1(data: Data) -> Data:
    """v2 -> v1: cents to units, the status enum to a lowercase string, shipping flattened."""
    cents = data["amount_cents"]
    if not isinstance(cents, int):
        raise ConversionError(f"orders v2 -> v1: amount_cents must be an integer, got {cents!r:.60}")
    if abs(cents) > MAX_EXACT_CENTS:
        raise ConversionError(f"orders v2 -> v1: amount_cents {cents} cannot be represented exactly "
                              "as a v1 double amount")
    shipping = data.get("shipping")
    return {
        "amount": cents / 100,
        "status": str(data["status"]).lower(),
        "shipping_address": shipping["address"] if shipping else None,
    }
