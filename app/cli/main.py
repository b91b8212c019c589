"""`python -m app`: the operator's commands (dev stack, worker, relay, outbox status, topics, dead letters).

The demo's own services start with `python -m services` (`services/__main__.py`).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.cli.preflight import StartupError, check_all, check_models_agree, create_topics, init_db, require
from app.registry import ModelsNotFound
from app.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="start embedded servers for unset URLs, the worker, and a demo writer")
    dev.add_argument("--demo", action="store_true", help="also run a demo service writing orders")
    dev.add_argument("--rate", type=float, default=20.0,
                     help="demo writes per second (default 20; 0: no writer, billing only)")
    dev.add_argument("--data-dir", default=".run", help="where embedded servers keep data and logs")
    dev.add_argument("--for-seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")
    sub.add_parser("worker", help="run the Faust worker (faust -A app.main worker -l info)")
    relay = sub.add_parser("relay", help="run only the outbox relay, without Faust (workers with RELAY_MODE=off); "
                                         "/metrics and /health on RELAY_WEB_PORT")
    relay.add_argument("--supervised", action="store_true",
                       help="as a worker's child (RELAY_MODE=process): stats as JSON lines on stdout, no web "
                            "server, stop when stdin closes")
    sub.add_parser("init-db", help="create the entity tables, the outbox and one PostgreSQL role per service")
    snapshot = sub.add_parser("snapshot", help="publish every live key's current state through the outbox, at its "
                                               "current sequence (consumers that have it skip it)")
    snapshot.add_argument("entities", nargs="*", metavar="ENTITY", help="only these entities (default: all)")
    snapshot.add_argument("--dry-run", action="store_true", help="print how many events each entity would publish")
    outbox = sub.add_parser("outbox", help="outbox commands")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    outbox_sub.add_parser("status", help="pending rows and the age of the oldest")
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
    topics = topic_sub.add_parser("list", help="every topic with its partitions and messages")
    topics.add_argument("--all", action="store_true", help="also the worker's changelog and repartition topics")
    tail = topic_sub.add_parser("tail", help="print a topic's last messages decoded, with headers, then new ones")
    tail.add_argument("topic")
    tail.add_argument("--from-start", action="store_true", help="every message from the start, not the last ones")
    tail.add_argument("--last", type=int, default=10, help="messages per partition shown before following (default 10)")
    tail.add_argument("--count", type=int, default=0, help="stop after this many messages (0: never)")
    tail.add_argument("--for-seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")
    tail.add_argument("--schema", metavar="ENTITY:VERSION", default=None,
                      help="decode with this schema (default: from the topic name <entity>-v<N>)")
    consumers = topic_sub.add_parser("consumers",
                                     help="consumer groups with committed offsets on a topic, lag per partition")
    consumers.add_argument("topic")
    archive = topic_sub.add_parser("archive", help="write every message of a topic, up to its end when the command "
                                                   "starts, to an Avro container file")
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


def begin(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    """The parsed arguments and the settings, with logging set up; a setting that does not parse
    is one line naming it and exit 2, not a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args, Settings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; startup failures print one line and exit non-zero.

    Each command's module is imported only when it runs, so `--help` and `schemas check`
    need neither Faust nor the servers' clients.
    """
    args, settings = begin(build_parser(), argv)
    try:
        if args.command == "dev":
            from app.cli.dev import run_dev
            sys.exit(run_dev(settings, demo=args.demo, rate=args.rate, data_dir=args.data_dir,
                             for_seconds=args.for_seconds))
        if args.command == "schemas":
            from app.cli.schemas import run_check
            from app.registry import load_models
            load_models(settings)  # the models, and the converters between versions beside them
            sys.exit(run_check(Path(args.dir) if args.dir else None))
        if args.command == "asyncapi":
            sys.exit(write_asyncapi(settings, args.out))
        if args.command in ("dlq", "topic", "replay"):
            require(settings, "kafka_broker", "KAFKA_BROKER")
            sys.exit(asyncio.run(_broker_command(settings, args)))
        require(settings, "database_url", "DATABASE_URL")
        if args.command == "worker":
            require(settings, "kafka_broker", "KAFKA_BROKER")
            check_models_agree(settings)
            asyncio.run(check_all(settings))
            # The agents subscribe at start: their topics must exist by then, or the worker
            # gets no partitions of them until some later rebalance.
            asyncio.run(create_topics(settings))
            # -l info: Faust's default level sets the root logger to DEBUG and costs ~25%.
            os.execvp(sys.executable, [sys.executable, "-m", "faust", "-A", "app.main", "worker", "-l", "info"])
        if args.command == "init-db":
            made = asyncio.run(init_db(settings))
            print(f"tables, outbox and roles ready; services connect as: {', '.join(made)}")
        elif args.command == "snapshot":
            from app.cli.snapshot import run_snapshot
            asyncio.run(run_snapshot(settings, args.entities, dry_run=args.dry_run))
        elif args.command == "relay":
            require(settings, "kafka_broker", "KAFKA_BROKER")
            from app.cli.relay import run_relay
            asyncio.run(run_relay(settings, supervised=args.supervised))
        elif args.command == "outbox":
            from app.cli.outbox import outbox_status
            asyncio.run(outbox_status(settings))
    except (StartupError, ModelsNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


async def _broker_command(settings: Settings, args: argparse.Namespace) -> int:
    """`dlq`, `topic` and `replay`: commands that need only the broker; their exit status."""
    if args.command == "dlq":
        from app.cli.dlq import dlq_command
        return await dlq_command(settings, args)
    if args.command == "topic":
        from app.cli.topics import topic_command
        return await topic_command(settings, args)
    from app.cli.replay import replay_command
    return await replay_command(settings)


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


