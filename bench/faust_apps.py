"""Faust apps of the stream benchmarks: `python -m faust -A bench.faust_apps:<name> worker -l info`.

- `naive`: one agent forwarding each value of `BENCH_SOURCE` to `BENCH_OUT`
  (`async for value in stream: await out.send(value=value)`), raw serializers.
- `downconvert_only`: our down-conversion agent (`agents.downconvert`) alone, without the
  views, cache and relay our worker also runs.

Both use our `App` (so our transport and its `CONSUMER_FETCH_MAX_WAIT_MS`) and the broker
settings of `app.main.create_app`; the apps are built on first access, from the environment.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import faust

from app.settings import Settings
from app.transport import App

#: What `app.main.create_app` passes to Faust besides the app's own settings.
BROKER_SETTINGS: dict[str, Any] = {
    "broker_session_timeout": 10,
    "broker_rebalance_timeout": 5,
    "broker_heartbeat_interval": 1,
    "processing_guarantee": "at_least_once",
    "producer_acks": -1,
    "autodiscover": False,
}


def _app(settings: Settings) -> faust.App:
    """An app configured like ours, with no agents."""
    return App(settings, broker=settings.kafka_broker, web_port=settings.web_port, web_host=settings.web_host,
               topic_partitions=settings.topic_partitions, **BROKER_SETTINGS)


def make_naive(settings: Settings, source: str, out: str) -> faust.App:
    """The naive forwarder: one value in, one `send` out."""
    app = _app(settings)
    source_topic = app.topic(source, key_serializer="raw", value_serializer="raw")
    out_topic = app.topic(out, key_serializer="raw", value_serializer="raw")

    async def naive_forward(stream: faust.StreamT[Any]) -> None:
        async for value in stream:
            await out_topic.send(value=value)

    app.agent(source_topic, name="naive_forward")(naive_forward)
    return app


def make_downconvert_only(settings: Settings) -> faust.App:
    """Our down-conversion agent alone."""
    import models  # noqa: F401  # registers the entity models (their legacy modes)
    from agents import downconvert, entity_pass

    app = _app(settings)
    entity_pass.install(app, {key: [job] for key, job in downconvert.jobs(settings).items()})
    return app


@functools.cache
def _build(name: str) -> faust.App:
    """The app `name`, configured from the environment (once per process)."""
    settings = Settings.from_env()
    if name == "naive":
        return make_naive(settings, os.environ["BENCH_SOURCE"], os.environ["BENCH_OUT"])
    return make_downconvert_only(settings)


def __getattr__(name: str) -> faust.App:
    """`bench.faust_apps:naive` and `bench.faust_apps:downconvert_only`, built on first access."""
    if name in ("naive", "downconvert_only"):
        return _build(name)
    raise AttributeError(name)
