"""The demo domain: customers, orders and the shipping extension of an order, and invoices."""
from models.customer import Customer
from models.invoice import Invoice
from models.order import Order, OrderShipping

__all__ = ["Customer", "Invoice", "Order", "OrderShipping"]
