"""`python -m app`: the operator's commands (dev stack, worker, relay, outbox status, demo)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from app.settings import Settings


class StartupError(RuntimeError):
    """A server the command needs is unreachable; the message names it and its address."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="start embedded servers for unset URLs, the worker, and a demo writer")
    dev.add_argument("--demo", action="store_true", help="also run a demo service writing orders")
    dev.add_argument("--rate", type=float, default=20.0, help="demo writes per second (default 20)")
    dev.add_argument("--data-dir", default=".run", help="where embedded servers keep data and logs")
    dev.add_argument("--for-seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")
    sub.add_parser("worker", help="run the Faust worker (faust -A app.main worker -l info)")
    sub.add_parser("relay", help="run only the outbox relay, without Faust")
    sub.add_parser("init-db", help="create the entity tables, the outbox and its trigger")
    outbox = sub.add_parser("outbox", help="outbox commands")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    outbox_sub.add_parser("status", help="pending rows and the age of the oldest")
    demo = sub.add_parser("demo", help="a demo service writing orders through the ORM")
    demo.add_argument("--rate", type=float, default=20.0, help="writes per second")
    demo.add_argument("--count", type=int, default=0, help="stop after this many writes (0: never)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; startup failures print one line and exit non-zero."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    try:
        if args.command == "dev":
            from app.dev import run_dev
            sys.exit(run_dev(settings, demo=args.demo, rate=args.rate, data_dir=args.data_dir,
                             for_seconds=args.for_seconds))
        require(settings, "database_url", "DATABASE_URL")
        if args.command == "worker":
            require(settings, "kafka_broker", "KAFKA_BROKER")
            asyncio.run(check_all(settings))
            # -l info: Faust's default level sets the root logger to DEBUG and costs ~25%.
            os.execvp(sys.executable, [sys.executable, "-m", "faust", "-A", "app.main", "worker", "-l", "info"])
        if args.command == "init-db":
            asyncio.run(init_db(settings))
        elif args.command == "relay":
            require(settings, "kafka_broker", "KAFKA_BROKER")
            asyncio.run(run_relay(settings))
        elif args.command == "outbox":
            asyncio.run(outbox_status(settings))
        elif args.command == "demo":
            from app.demo import run_demo
            asyncio.run(run_demo(settings, rate=args.rate, count=args.count))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def require(settings: Settings, field: str, env: str) -> None:
    """Fail with one line when a URL the command needs is not configured."""
    if not getattr(settings, field):
        raise StartupError(f"{env} is not set (or use `python -m app dev`, which starts embedded servers)")


async def check_database(settings: Settings) -> None:
    """Connect once, so an unreachable database is one clear line instead of a traceback."""
    import asyncpg

    try:
        conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        raise StartupError(f"cannot reach PostgreSQL at {_where(settings.database_url)}: {exc}") from None
    await conn.close()


async def check_broker(settings: Settings) -> None:
    """Fetch metadata once, so an unreachable broker is one clear line."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=5000)
    try:
        await producer.start()
    except KafkaError as exc:
        raise StartupError(f"cannot reach the Kafka broker at {settings.kafka_broker}: {exc}") from None
    finally:
        await producer.stop()


async def check_all(settings: Settings) -> None:
    """Check the database and the broker before starting anything that needs both."""
    await check_database(settings)
    await check_broker(settings)


def _where(url: str) -> str:
    """host:port/db of a database URL, without credentials."""
    return url.rsplit("@", 1)[-1]


async def init_db(settings: Settings) -> None:
    """Create tables and the outbox."""
    import models  # noqa: F401
    from app.orm import Database

    await check_database(settings)
    db = Database(settings.database_url, record_reads=False)
    await db.create_all()
    await db.close()


async def run_relay(settings: Settings) -> None:
    """Run the relay until interrupted."""
    import models  # noqa: F401
    from app.relay import Relay

    await check_all(settings)
    await Relay(settings).run()


async def outbox_status(settings: Settings) -> None:
    """Print pending outbox rows and the age of the oldest."""
    import asyncpg

    await check_database(settings)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        count, oldest = await conn.fetchrow(
            "SELECT count(*), EXTRACT(epoch FROM clock_timestamp() - min(occurred_at)) FROM outbox")
    finally:
        await conn.close()
    print(f"pending rows: {count}\noldest: {float(oldest or 0):.3f} s")
