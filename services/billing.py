"""The billing service: keeps one invoice per paid order, from the orders events, through the inbox.

It owns `invoices` and never reads the orders table (another service's data): each order
event carries the order's state, and the inbox (`app.inbox`) applies each event exactly once.
An order is invoiced while its status is paid or shipped; a cancelled or deleted order's
invoice is removed. The invoice writes go through the evented ORM in the inbox's transaction,
so `invoices-v1` events are raised exactly when the order event is applied.
`python -m services billing` runs it, with `/metrics`, `/health/*` and `/status` (`/status.json`) on
`BILLING_WEB_PORT`.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.inbox.consumer import Inbox
from app.inbox.events import InboxEvent
from app.inbox.metrics import InboxCollector
from app.ops.process_web import process_web, start_web
from app.orm import Database
from app.settings import Settings
from app.topology import current_topic
from models.invoice import Invoice

SERVICE = "billing"
#: Order statuses that carry an invoice.
INVOICED = frozenset({"paid", "shipped"})


async def apply_order_events(session: AsyncSession, events: list[InboxEvent]) -> None:
    """Make each order's invoice match its state after `events` (in order): one read of the
    batch's invoices, then the writes the flush sends together."""
    order_ids = {int(e.key) for e in events}
    invoices: dict[int, list[Invoice]] = {order_id: [] for order_id in order_ids}
    for invoice in (await session.execute(select(Invoice).where(Invoice.order_id.in_(order_ids)))).scalars():
        invoices[invoice.order_id].append(invoice)
    for event in events:
        order_id, order = int(event.key), event.data
        mine = invoices[order_id]
        if event.op == "delete" or order is None or order["status"] not in INVOICED:
            for invoice in mine:
                if invoice in session.new:  # created earlier in this batch
                    session.expunge(invoice)
                else:
                    await session.delete(invoice)
            mine.clear()
        elif not mine:
            mine.append(Invoice(order_id=order_id, amount_cents=order["amount_cents"], currency=order["currency"]))
            session.add(mine[0])
        else:
            for invoice in mine:  # one, unless something applied an event twice (the checker counts)
                invoice.amount_cents = order["amount_cents"]
                invoice.currency = order["currency"]


async def apply_order_event(session: AsyncSession, event: InboxEvent) -> None:
    """`apply_order_events` for one event."""
    await apply_order_events(session, [event])


async def check_tables(db: Database) -> None:
    """One clear line, not a dead letter per event, when `init-db` has not created the tables."""
    from sqlalchemy import text
    from sqlalchemy.exc import ProgrammingError

    from app.errors import StartupError

    try:
        async with db.engine.connect() as conn:
            await conn.execute(text("SELECT FROM invoices, inbox, inbox_keys LIMIT 0"))
    except ProgrammingError as exc:
        raise StartupError(f"the billing tables are missing or not readable ({exc.orig}): "
                           "run `python -m app init-db`") from None


def billing_inbox(settings: Settings, db: Database) -> Inbox:
    """The inbox consumer of `orders-v2` that keeps the invoices."""
    return Inbox(settings, db, SERVICE, [current_topic("orders")], batch_handler=apply_order_events)


async def run_billing(settings: Settings) -> None:
    """Run the billing consumer until SIGTERM or SIGINT.

    The tables come from `python -m app init-db` (as `make dev`, Docker Compose and the tests
    run it): installing them here would take table locks against the writers on every restart.
    """
    db = Database(settings.database_url_for(SERVICE), service=SERVICE)
    try:
        await check_tables(db)
    except BaseException:
        await db.close()
        raise
    inbox = billing_inbox(settings, db)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, inbox.stop)
    runner = None
    if settings.billing_web_port:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(InboxCollector(inbox))

        def ready() -> tuple[bool, dict[str, Any]]:
            return inbox.stats.connected, {"consumer": inbox.name, "error": inbox.stats.error}

        def status() -> dict[str, Any]:
            stats = inbox.stats
            return {"consumer": inbox.name, "topics": inbox.topics, "applied": stats.applied,
                    "skipped_duplicate": stats.skipped_duplicate, "skipped_old": stats.skipped_old,
                    "gaps": stats.gaps, "dead_lettered": stats.dead_lettered,
                    "lag": sum(stats.lag.values()), "lag_by_partition": stats.lag, "connected": stats.connected,
                    # What fails now; the last error stays for history, with its time.
                    "error": stats.error, "last_error": stats.last_error,
                    "last_error_at": datetime.fromtimestamp(stats.last_error_at, UTC).isoformat(timespec="seconds")
                    if stats.last_error_at else None}

        runner = await start_web(process_web(registry, ready, status), settings.web_host,
                                 settings.billing_web_port, SERVICE)
    try:
        await inbox.run()
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await db.close()
