"""`python -m app`: the operator's commands (dev stack, worker, relay, outbox status, demo)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.settings import Settings

if TYPE_CHECKING:
    from app.wire.schemas import EventSchema


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
    sub.add_parser("relay", help="run only the outbox relay, without Faust (workers with RELAY_IN_WORKER=0); "
                                 "/metrics and /health on RELAY_WEB_PORT")
    sub.add_parser("init-db", help="create the entity tables, the outbox and one PostgreSQL role per service")
    outbox = sub.add_parser("outbox", help="outbox commands")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    outbox_sub.add_parser("status", help="pending rows and the age of the oldest")
    demo = sub.add_parser("demo", help="a demo service writing orders through the ORM")
    demo.add_argument("--rate", type=float, default=20.0, help="writes per second")
    demo.add_argument("--count", type=int, default=0, help="stop after this many writes (0: never)")
    schemas = sub.add_parser("schemas", help="schema commands")
    schemas_sub = schemas.add_subparsers(dest="schemas_command", required=True)
    check = schemas_sub.add_parser("check", help="every .avsc parses; every older version resolves from each newer one")
    check.add_argument("--dir", default=None, help="schema directory (default: the project's schemas/)")
    dlq = sub.add_parser("dlq", help="dead-letter topic commands (KAFKA_BROKER)")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="one line per dead letter: partition, offset, key, error, source")
    dlq_list.add_argument("topic", help="the dead-letter topic, e.g. orders-v2.dlq")
    dlq_list.add_argument("--limit", type=int, default=None, help="at most this many letters")
    dlq_redrive = dlq_sub.add_parser("redrive", help="re-send dead letters not redriven yet to their source topics")
    dlq_redrive.add_argument("topic", help="the dead-letter topic, e.g. orders-v2.dlq")
    topic = sub.add_parser("topic", help="topic commands (KAFKA_BROKER)")
    topic_sub = topic.add_subparsers(dest="topic_command", required=True)
    consumers = topic_sub.add_parser("consumers", help="consumer groups with committed offsets on a topic, lag per partition")
    consumers.add_argument("topic")
    archive = topic_sub.add_parser("archive", help="write every message of a topic to an Avro container file")
    archive.add_argument("topic")
    archive.add_argument("--to", required=True, metavar="FILE.avro", help="the file to write")
    archive.add_argument("--schema", default=None, metavar="ENTITY:VERSION",
                         help="decode with this schema (default: from the topic name <entity>-v<N>)")
    archive.add_argument("--delete", action="store_true",
                         help="delete the topic once the file is written and re-read with the same count")
    sub.add_parser("replay", help="with the workers stopped: make their next start rebuild views and cache "
                                  "from offset 0 (deletes the consumer group, view topics, table stores "
                                  "and cached entities)")
    asyncapi = sub.add_parser("asyncapi", help="print the AsyncAPI 3.0.0 document of the topics (pretty JSON)")
    asyncapi.add_argument("--out", default=None, metavar="FILE", help="write it to FILE instead of stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; startup failures print one line and exit non-zero."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    try:
        if args.command == "dev":
            from app.cli.dev import run_dev
            sys.exit(run_dev(settings, demo=args.demo, rate=args.rate, data_dir=args.data_dir,
                             for_seconds=args.for_seconds))
        if args.command == "schemas":
            from app.wire.compat import run_check
            sys.exit(run_check(Path(args.dir) if args.dir else None))
        if args.command == "asyncapi":
            sys.exit(write_asyncapi(settings, args.out))
        if args.command in ("dlq", "topic", "replay"):
            require(settings, "kafka_broker", "KAFKA_BROKER")
            run = {"dlq": dlq_command, "topic": topic_command, "replay": replay_command}[args.command]
            sys.exit(asyncio.run(run(settings, args)))
        require(settings, "database_url", "DATABASE_URL")
        if args.command == "worker":
            require(settings, "kafka_broker", "KAFKA_BROKER")
            asyncio.run(check_all(settings))
            # The agents subscribe at start: their topics must exist by then, or the worker
            # gets no partitions of them until some later rebalance.
            asyncio.run(create_topics(settings))
            # -l info: Faust's default level sets the root logger to DEBUG and costs ~25%.
            os.execvp(sys.executable, [sys.executable, "-m", "faust", "-A", "app.main", "worker", "-l", "info"])
        if args.command == "init-db":
            made = asyncio.run(init_db(settings))
            print(f"tables, outbox and roles ready; services connect as: {', '.join(made)}")
        elif args.command == "relay":
            require(settings, "kafka_broker", "KAFKA_BROKER")
            asyncio.run(run_relay(settings))
        elif args.command == "outbox":
            asyncio.run(outbox_status(settings))
        elif args.command == "demo":
            from models.demo import run_demo
            asyncio.run(run_demo(settings, rate=args.rate, count=args.count))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def write_asyncapi(settings: Settings, out: str | None) -> int:
    """Print the AsyncAPI document, or write it to `out`; needs no server."""
    import json

    from app.ops.asyncapi import build_document

    text = json.dumps(build_document(settings), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


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
    # aiokafka logs its own ERROR for each failed connection attempt; the StartupError below
    # says the same in one line, so its logger is quiet for the check.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        await producer.start()
    except KafkaError as exc:
        raise StartupError(f"cannot reach the Kafka broker at {settings.kafka_broker}: {exc}") from None
    finally:
        await producer.stop()
        quiet.setLevel(level)


async def create_topics(settings: Settings) -> None:
    """Create the event topics (and dead-letter topics) the worker consumes and produces."""
    import models  # noqa: F401
    from agents.views import dead_letter_topics
    from app.topology import evented_topics
    from app.outbox.relay import DLQ_TOPIC, ensure_topics

    await ensure_topics(settings, [*evented_topics(), DLQ_TOPIC, *dead_letter_topics(settings.app_id)])


async def check_all(settings: Settings) -> None:
    """Check the database and the broker before starting anything that needs both."""
    await check_database(settings)
    await check_broker(settings)


def _where(url: str) -> str:
    """host:port/db of a database URL, without credentials."""
    return url.rsplit("@", 1)[-1]


async def init_db(settings: Settings) -> list[str]:
    """Create tables and the outbox, and the services' roles with their privileges.

    Runs as `DATABASE_URL`'s role, which owns the tables. A password in a service's own URL
    (`DATABASE_URL_<SERVICE>`) becomes its role's password. Returns the roles.
    """
    import models  # noqa: F401
    from app.capture import roles
    from app.capture import Database, EventedBase

    await check_database(settings)
    try:
        passwords = roles.role_passwords(dict(settings.service_database_urls), settings.db_role_prefix)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    # The tables' owner, provisioning: no service's SQL filter applies to it.
    db = Database(settings.database_url, record_reads=False, sql_filter=False)
    try:
        await db.create_all()
        async with db.engine.begin() as conn:
            return await conn.run_sync(lambda c: roles.provision(
                c, EventedBase, settings.db_role_prefix, passwords))
    finally:
        await db.close()


async def run_relay(settings: Settings) -> None:
    """Run the relay until interrupted."""
    import models  # noqa: F401
    from app.cli.relay import serve

    await check_all(settings)
    await serve(settings)


async def outbox_status(settings: Settings) -> None:
    """Print pending outbox rows and the age of the oldest."""
    import asyncpg

    from app.outbox.store import LAG_SQL

    await check_database(settings)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        count, oldest = await conn.fetchrow(LAG_SQL)
    finally:
        await conn.close()
    print(f"pending rows: {count}\noldest: {float(oldest or 0):.3f} s")


async def dlq_command(settings: Settings, args: argparse.Namespace) -> int:
    """`dlq list` / `dlq redrive`; a topic or letter problem is one line and exit 1."""
    from aiokafka.errors import KafkaError

    from app.cli.dlq import LIST_HEADER, list_dead_letters, redrive
    from app.ops.offsets import TopicError

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # keep the output to what was asked
    await check_broker(settings)
    try:
        if args.dlq_command == "list":
            letters = await list_dead_letters(settings, args.topic, args.limit)
            print(LIST_HEADER)
            for letter, redriven in letters:
                print(letter.line(redriven))
            print(f"{len(letters)} dead letter(s) listed from {args.topic}", file=sys.stderr)
        else:
            done = await redrive(settings, args.topic)
            for item in done:
                print(item.line())
            print(f"redriven {len(done)} dead letter(s) from {args.topic}")
    except (TopicError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def topic_command(settings: Settings, args: argparse.Namespace) -> int:
    """`topic consumers` / `topic archive`; a topic problem is one line and exit 1."""
    from aiokafka.errors import KafkaError

    from app.ops.offsets import TopicError, archive_topic, format_group_offsets, group_offsets

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # keep the output to what was asked
    await check_broker(settings)
    try:
        if args.topic_command == "consumers":
            for line in format_group_offsets(args.topic, await group_offsets(settings, args.topic)):
                print(line)
            return 0
        schema = archive_schema(args.topic, args.schema)
        done = await archive_topic(settings, args.topic, Path(args.to), schema, delete=args.delete)
        print(f"archived {done.count} message(s) from {done.topic} to {done.path}")
        if done.deleted:
            print(f"deleted topic {done.topic}")
    except (TopicError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def replay_command(settings: Settings, _args: argparse.Namespace) -> int:
    """`replay`; a refusal (a worker still running) is one line and exit 1."""
    from aiokafka.errors import KafkaError

    from app.cli.replay import replay
    from app.ops.offsets import TopicError

    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    await check_broker(settings)
    try:
        report = await replay(settings)
    except (TopicError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0


def archive_schema(topic: str, override: str | None) -> EventSchema:
    """The schema to decode `topic` with: `entity:version` when given, else from `<entity>-v<N>`."""
    from app.wire.codec import schema_for_topic
    from app.wire.schemas import load
    from app.ops.offsets import TopicError

    try:
        if override:
            entity, _, version = override.partition(":")
            return load(entity, int(version.removeprefix("v")))
        return schema_for_topic(topic)
    except (LookupError, ValueError) as exc:
        hint = "" if override else "; pass --schema entity:version"
        raise TopicError(f"no schema for topic {topic}: {exc}{hint}") from None
