"""The Faust app (`faust -A app.main worker -l info`): wiring only.

It declares the agents (`agents/`), the views, the one cache repository, the web handlers and the
operations endpoints, and hands each the parts it uses: nothing else in `app/` imports `agents/`.
"""
from __future__ import annotations

from mode import Service

from agents import cache, downconvert, entity_pass, views
from app.cache import CacheResource
from app.capture.agreement import check_models
from app.ops import endpoints as ops
from app.ops.endpoints import Ops
from app.ops.metrics import DownconvertCounts
from app.orm import EventedBase
from app.outbox import relay_host
from app.registry import load_models
from app.settings import Settings
from app.transport import App, DirectTopic
from app.web import install as web
from app.web import owner as owner_apis
from app.web.tables import View


class WorkerApp(App):
    """The worker's Faust app, with what `create_app` wires into it, typed."""

    #: The view tables by name (`agents/views.py`: entities' and aggregations'), served by `app/web/`.
    views: dict[str, View]
    #: The one cache repository (`entity_cache`: Faust's App already has a `cache` attribute).
    entity_cache: CacheResource | None
    #: Metrics, health, status page and watchdog.
    ops: Ops


def create_app(settings: Settings) -> WorkerApp:
    """A Faust app configured from `settings` (no network I/O until the worker starts).

    Refuses (`ModelSchemaMismatch`) when a model and its Avro schema disagree.
    """
    load_models(settings)  # MODELS: the entities whose topics the relay and the agents handle
    check_models(EventedBase)
    app = WorkerApp(
        settings,
        broker=settings.kafka_broker or "kafka://127.0.0.1:9092",
        web_port=settings.web_port,
        # Faust binds every interface unless told: bind what WEB_HOST says (loopback by default).
        web_bind=settings.web_host,
        web_host=settings.advertised_host,
        # Tansu joins consumer groups in ~30 s with Faust's defaults; these make it ~5 s.
        broker_session_timeout=10,
        broker_rebalance_timeout=5,
        broker_heartbeat_interval=1,
        # Changelog and repartition topics get as many partitions as the event topics.
        topic_partitions=settings.topic_partitions,
        # Tansu has no idempotent/transactional producer: exactly-once comes from event ids
        # and per-key sequences, so keep Faust at-least-once.
        processing_guarantee="at_least_once",
        # On a rebalance Faust waits for every event its streams took in to be acked. A batching
        # agent's drainer can hold one it cannot hand over while flow control is suspended, and
        # the rebalance then never completes: a worker added during a backlog kept re-joining
        # (tests/chaos: "a second worker added during a backlog"). Every stage is idempotent, so
        # an event in flight is simply processed again by the partition's next owner.
        stream_wait_empty=False,
        producer_acks=-1,
        # Each event fans out to changelog and repartition sends; a few ms of linger turns
        # them into batches instead of one tiny produce request each.
        producer_linger=settings.producer_linger_ms / 1000,
        producer_max_batch_size=settings.producer_max_batch_bytes,
        producer_max_request_size=max(settings.producer_max_batch_bytes * 2, 1_048_576),
        autodiscover=False,
        Topic=DirectTopic,
        **({"datadir": settings.data_dir} if settings.data_dir else {}),
        # Table storage for every table (a table-level `store="rocksdb://"` parses to a falsy
        # URL and silently falls back to memory).
        **({"store": settings.table_store} if settings.table_store else {}),
        recovery_consistency_check=settings.recovery_consistency_check,
        consumer_auto_offset_reset=settings.consumer_auto_offset_reset,
        **({"consumer_group_instance_id": settings.group_instance_id} if settings.group_instance_id else {}),
    )
    downconverted = DownconvertCounts()  # counted by the agents, exported by the metrics
    # Every entity's latest-state table and the aggregations its model declares (agents/views.py).
    app.views, stage1 = views.install(app, settings)
    # One pass over each current topic runs every job that reads it (agents/entity_pass.py).
    jobs: dict[tuple[str, int], list[entity_pass.Job]] = {
        key: [job] for key, job in downconvert.jobs(settings, counted=downconverted).items()}
    for key, job in stage1.items():
        jobs.setdefault(key, []).append(job)
    entity_pass.install(app, jobs)
    # Without Redis there is no cache to keep fresh (reads go to the database), and
    # `/entities` answers 503.
    app.entity_cache = CacheResource(settings) if settings.redis_url else None
    if app.entity_cache is not None:
        cache.install(app, settings, app.entity_cache)
    web.install(app, settings, app.views, app.entity_cache)  # `/tables/` and `/entities/`
    # The owner services' HTTP APIs this worker serves (OWNER_APIS; the demo: customers).
    owner = owner_apis.install(app, settings)
    # The worker runs the relay (a child process by default: RELAY_MODE), unless operators run
    # it as processes of their own (`python -m app relay`, RELAY_MODE=off).
    relay = relay_host.host_for(settings)

    @app.service
    class Lifecycle(Service):
        """Runs the outbox relay (when the worker runs it) and closes clients with the worker."""

        async def on_start(self) -> None:
            if relay is not None:
                await relay.start()

        async def on_stop(self) -> None:
            if relay is not None:
                await relay.stop()
            await owner.close()
            if app.entity_cache is not None:
                await app.entity_cache.close()

    # /metrics, /health/*, /status and the agent watchdog.
    app.ops = ops.install(app, settings, relay=relay, downconverted=downconverted, views=app.views,
                          cache=app.entity_cache)
    return app


app = create_app(Settings.from_env())
