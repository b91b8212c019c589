"""`python -m services`: the demo's services, run as any company service runs its own.

The library (`python -m app`) does not know the demo: a service ships its own entry point, and
this is the demo's. `demo` writes customers and orders through the ORM; `billing` keeps one
invoice per paid order from `orders-v2` through the transactional inbox.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from app.cli.main import begin
from app.cli.preflight import check_all, require
from app.errors import StartupError
from app.registry import ModelsNotFound


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the demo's services."""
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("billing", help="the billing service: keeps one invoice per paid order from orders-v2 "
                                   "through the transactional inbox; /metrics and /health on BILLING_WEB_PORT")
    demo = sub.add_parser("demo", help="a demo service writing customers and orders through the ORM")
    demo.add_argument("--rate", type=float, default=20.0, help="writes per second")
    demo.add_argument("--count", type=int, default=0, help="stop after this many writes (0: never)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one service; a startup failure prints one line and exits 2."""
    args, settings = begin(build_parser(), argv)
    try:
        require(settings, "database_url", "DATABASE_URL")
        if args.command == "billing":
            require(settings, "kafka_broker", "KAFKA_BROKER")
            from services.billing import run_billing
            asyncio.run(check_all(settings))
            asyncio.run(run_billing(settings))
        elif args.command == "demo":
            from services.demo import run_demo
            asyncio.run(run_demo(settings, rate=args.rate, count=args.count))
    except (StartupError, ModelsNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
