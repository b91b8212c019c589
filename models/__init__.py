"""The demo domain: customers, orders and the shipping extension of an order."""
from models.customer import Customer
from models.order import Order, OrderShipping

__all__ = ["Customer", "Order", "OrderShipping"]
