"""`python -m app relay`: the outbox relay as its own process, with /metrics and /health.

Run it next to workers started with `RELAY_IN_WORKER=0`, so the relay's Avro encoding does
not share the stream agents' event loop (README: Performance). Several may run: one holds the
relay lock and publishes, the others wait on standby and take over when it dies.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from app.cli.preflight import check_all, check_models_agree
from app.ops.metrics import RelayCollector
from app.ops.process_web import process_web, start_web
from app.outbox.relay import Relay
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


async def serve(settings: Settings) -> None:
    """Relay until SIGTERM or SIGINT; the web server runs when `relay_web_port` is not 0."""
    relay = Relay(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    runner: web.AppRunner | None = None
    if settings.relay_web_port:
        runner = await start_web(relay_web(relay), settings.web_host, settings.relay_web_port, "relay")
    try:
        await relay.run()
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        log.info("relay stopped after publishing %d events", relay.stats.published)


async def run_relay(settings: Settings) -> None:
    """Run the relay until interrupted."""
    check_models_agree(settings)  # loads the models whose topics it publishes, and checks them
    await check_all(settings)
    await serve(settings)
