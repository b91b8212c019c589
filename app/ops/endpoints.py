"""Operations endpoints of the worker: `/metrics`, `/health/live`, `/health/ready`, `/status`.

- `GET /metrics`: Prometheus text format from the app's own registry (`app.ops.metrics`).
- `GET /health/live`: 200 `{"status": "live", ...}` whenever the event loop answers.
- `GET /health/ready`: 200 `{"status": "ready"}` once tables are recovered, no rebalance is
  under way and the relay holds a PostgreSQL connection, and no agent is failing or stuck
  (see `app.ops.health` and `app.ops.watchdog`); else 503 `{"error": "not ready", "reasons": [...]}`, each reason naming
  the part and the error (`agent refresh_cache_orders: stuck: retrying the same batch ...`).
- `GET /status`: HTML page with a live chart; `GET /status.json`: its data.
- `GET /asyncapi.json`: the AsyncAPI document of the topics (what `python -m app asyncapi` prints).
- `GET /debug/consumer`: what the Kafka consumer is doing, per partition, fetcher, coordinator
  and agent (`app.ops.consumer_state`), to diagnose a stall; SIGUSR2 logs the same as one line.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faust
from faust.web import Request, Response
from faust.web import View as FaustView
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.ops.consumer_state import ConsumerStateSignal, consumer_state
from app.ops.health import not_ready
from app.ops.metrics import DownconvertCounts, Sources, new_registry
from app.ops.progress import ProgressSensor
from app.ops.status_page import StatusHistory, page, status_body
from app.ops.watchdog import Watchdog, WatchdogPolicy
from app.settings import Settings
from app.web.errors import guarded
from app.web.params import wants_html

if TYPE_CHECKING:
    from app.cache import CacheResource, CacheStats
    from app.outbox.relay_host import RelayHost
    from app.web.tables import View

log = logging.getLogger(__name__)

__all__ = ["Ops", "install"]


@dataclass
class Ops:
    """What `install` added to the app (`app.ops`)."""

    sources: Sources
    progress: ProgressSensor
    watchdog: Watchdog
    history: StatusHistory
    registry: CollectorRegistry

    def ready(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not)."""
        reasons = self.sources.not_ready()
        return not reasons, reasons


def install(app: faust.App, settings: Settings, *, relay: RelayHost | None = None,
            downconverted: DownconvertCounts | None = None, views: Mapping[str, View] | None = None,
            cache: CacheResource | None = None, policy: WatchdogPolicy | None = None) -> Ops:
    """Add the progress sensor, the watchdog and the ops endpoints to `app`; returns them."""
    progress = ProgressSensor(app)
    app.sensors.add(progress)
    watchdog = Watchdog(app, progress, policy or WatchdogPolicy(
        stuck_after=settings.stuck_after, consumer_stall_after=settings.stall_after,
        reseek_after=settings.reseek_after))

    def caches() -> dict[str, CacheStats]:
        # Only a repository already opened: a scrape must not open clients. "worker": the one
        # the cache agents and the entity endpoint share.
        opened = cache.opened if cache is not None else None
        return {"worker": opened.stats} if opened is not None else {}

    sources = Sources(app=app, progress=progress, relay=relay, downconverted=downconverted or DownconvertCounts(),
                      views=views or {}, caches=caches,
                      not_ready=lambda: not_ready(app, relay, watchdog), running=watchdog.running,
                      stuck=watchdog.stuck)
    history = StatusHistory(sources)
    ops = Ops(sources, progress, watchdog, history, new_registry(sources))
    # Both start after table recovery, with the app's other services (Faust starts instances as given).
    app.service(watchdog)  # type: ignore[arg-type]  # Faust's stub wants a class; it takes an instance as well
    app.service(history)  # type: ignore[arg-type]  # as above
    # A dependency of the app, not an app service: those start only after table recovery, and a
    # recovery stalled by a rebalance is one of the things SIGUSR2 is for.
    app.add_dependency(ConsumerStateSignal(app))
    _pages(app, ops, settings)
    return ops


#: What `/` lists for a client that does not want HTML.
INDEX = {"status": "OK", "links": {"status": "/status", "status_json": "/status.json", "tables": "/tables/",
                                   "metrics": "/metrics", "ready": "/health/ready", "asyncapi": "/asyncapi.json"}}


def _pages(app: faust.App, ops: Ops, settings: Settings) -> None:
    @app.page("/", name="mse-index")
    class Index(FaustView):
        """`/`: a browser is sent to the status page; a client gets Faust's `{"status": "OK"}`
        (what probes of the root expect) with links to everything else."""

        async def get(self, request: Request, **_: Any) -> Response:
            if wants_html(request.headers.get("Accept", ""), request.query):
                return self.text("", status=302, headers={"Location": "/status"})
            return self.json(INDEX)

    @app.page("/metrics", name="mse-metrics")
    class Metrics(FaustView):
        """Prometheus metrics."""

        async def get(self, request: Request, **_: Any) -> Response:
            async def answer() -> Response:
                # Content-Type in headers: aiohttp refuses a charset inside `content_type`.
                return self.bytes(generate_latest(ops.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
            return await guarded(self, request, answer, "ops")

    @app.page("/health/live", name="mse-health-live")
    class Live(FaustView):
        """Liveness: answering at all is the check."""

        async def get(self, request: Request, **_: Any) -> Response:
            return self.json({"status": "live", "loop_lag_seconds": round(ops.watchdog.loop_lag, 4)})

    @app.page("/health/ready", name="mse-health-ready")
    class Ready(FaustView):
        """Readiness: tables recovered, relay connected, no failing agent."""

        async def get(self, request: Request, **_: Any) -> Response:
            async def answer() -> Response:
                ready, reasons = ops.ready()
                if ready:
                    return self.json({"status": "ready"})
                return self.json({"error": "not ready", "reasons": reasons}, status=503,
                                 headers={"Retry-After": "1"})
            return await guarded(self, request, answer, "ops")

    @app.page("/status", name="mse-status")
    class Status(FaustView):
        """The operator's first look: a live chart of the pipeline."""

        async def get(self, request: Request, **_: Any) -> Response:
            async def answer() -> Response:
                body = status_body(ops.sources, ops.history, ops.watchdog.states)
                return self.html(page(body), headers={"Cache-Control": "no-store"})
            return await guarded(self, request, answer, "ops")

    @app.page("/status.json", name="mse-status-json")
    class StatusJson(FaustView):
        """The status page's data."""

        async def get(self, request: Request, **_: Any) -> Response:
            async def answer() -> Response:
                body = status_body(ops.sources, ops.history, ops.watchdog.states)
                return self.json(body, headers={"Cache-Control": "no-store"})
            return await guarded(self, request, answer, "ops")

    @app.page("/asyncapi.json", name="mse-asyncapi")
    class AsyncApi(FaustView):
        """The AsyncAPI 3 document of every topic, built from the models and schemas."""

        async def get(self, request: Request, **_: Any) -> Response:
            async def answer() -> Response:
                from app.ops.asyncapi import build_document  # the document is built only when asked for

                return self.json(build_document(settings), headers={"Cache-Control": "no-cache"})
            return await guarded(self, request, answer, "ops")

    @app.page("/debug/consumer", name="mse-debug-consumer")
    class DebugConsumer(FaustView):
        """The consumer-state dump: where each partition's fetching and committing stand."""

        async def get(self, request: Request, **_: Any) -> Response:
            async def answer() -> Response:
                return self.json(consumer_state(app), headers={"Cache-Control": "no-store"})
            return await guarded(self, request, answer, "ops")
