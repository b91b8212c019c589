"""`python -m app relay`: the outbox relay as its own process, with /metrics and /health.

Run it next to workers started with `RELAY_MODE=off`: several may run, and they share the
outbox shards (app/outbox/relay.py). A worker in `RELAY_MODE=process` (the default) starts one
as its child with `--supervised` (app/outbox/relay_host.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from app.cli.preflight import check_all, check_models_agree
from app.ops.metrics import RelayCollector
from app.ops.process_web import process_web, start_web
from app.outbox.relay import Relay
from app.outbox.relay_host import report_stats, report_until_orphaned
from app.settings import Settings

log = logging.getLogger(__name__)


def relay_web(relay: Relay) -> web.Application:
    """`/metrics` (the relay's families), `/health/live` and `/health/ready` (connected)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay.stats))

    def ready() -> tuple[bool, dict[str, Any]]:
        stats = relay.stats
        return stats.connected, {"active": stats.active, "shards": list(stats.shards), "published": stats.published,
                                 "pending_rows": stats.pending_rows, "error": stats.error,
                                 "last_error": stats.last_error}

    return process_web(registry, ready)


async def serve(settings: Settings, *, supervised: bool = False) -> None:
    """Relay until SIGTERM or SIGINT (or, `supervised`, until stdin closes); the web server
    runs when `relay_web_port` is not 0."""
    relay = Relay(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    runner: web.AppRunner | None = None
    if settings.relay_web_port:
        runner = await start_web(relay_web(relay), settings.web_host, settings.relay_web_port, "relay")
    reporter = asyncio.ensure_future(report_until_orphaned(relay)) if supervised else None
    try:
        await relay.run()
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(OSError):  # the last counts, unless the worker is gone
                report_stats(relay, sys.stdout)
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        log.info("relay stopped after publishing %d events", relay.stats.published)


async def run_relay(settings: Settings, *, supervised: bool = False) -> None:
    """Run the relay until interrupted."""
    check_models_agree(settings)  # loads the models whose topics it publishes, and checks them
    if not supervised:  # a worker's child: the worker checked the servers before starting it
        await check_all(settings)
    await serve(settings, supervised=supervised)
