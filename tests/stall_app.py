"""A test-only worker app: the real app plus agents that stall or crash on purpose.

Run as `python -m faust -A tests.stall_app worker -l info` with `STALL_TOPIC` and `STUCK_TOPIC`
set. `stall_on_purpose` blocks forever on the value `stall`, raises on `poison`, returns on
`quit` and logs everything else; `stuck_on_purpose` blocks forever on every value. The watchdog is tuned
here as a deployment would tune it, before the worker starts.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust

from app.main import create_app
from app.ops.watchdog import WatchdogPolicy
from app.settings import Settings

log = logging.getLogger(__name__)

app = create_app(Settings.from_env())
app.ops.watchdog.policy = WatchdogPolicy(  # type: ignore[attr-defined]
    check_interval=0.25, stall_after=1.5, dead_after=2.0, max_attempts=2, max_backoff=30.0)

stall_topic = app.topic(os.environ["STALL_TOPIC"], key_serializer="raw", value_serializer="raw")
stuck_topic = app.topic(os.environ["STUCK_TOPIC"], key_serializer="raw", value_serializer="raw")


async def stall_on_purpose(stream: faust.StreamT[Any]) -> None:
    """Blocks forever on `stall`, raises on `poison`, returns on `quit`, logs anything else."""
    async for value in stream:
        if value == b"stall":
            log.info("stall_on_purpose: stalling")
            await asyncio.Event().wait()
        if value == b"poison":
            raise ValueError("poison value")
        if value == b"quit":
            log.info("stall_on_purpose: returning")
            return
        log.info("stall_on_purpose: processed %s", value.decode())


async def stuck_on_purpose(stream: faust.StreamT[Any]) -> None:
    """Blocks forever on every value: restarts never help."""
    async for value in stream:
        log.info("stuck_on_purpose: stuck on %s", value.decode())
        await asyncio.Event().wait()


app.agent(stall_topic, name="stall_on_purpose")(stall_on_purpose)
app.agent(stuck_topic, name="stuck_on_purpose")(stuck_on_purpose)
