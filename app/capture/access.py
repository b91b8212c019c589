"""The access log: ORM reads of entities, batched into access events through the outbox."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.wire.schemas import ACCESS_TOPIC

log = logging.getLogger(__name__)

#: Seconds between two writes of the buffered reads (one access event per entity each).
FLUSH_INTERVAL = 0.25
#: Distinct keys an access batch holds before it is written early.
MAX_KEYS = 5000


class AccessLog:
    """Buffers ORM reads and writes them as one access event per entity and interval.

    Reads are best-effort by design: they go through the outbox (so services need no Kafka
    client) but in a separate, batched transaction, never in the reader's own.
    """

    def __init__(self, engine: AsyncEngine, service: str, interval: float, max_keys: int) -> None:
        self._engine = engine
        self._service = service
        self._interval = interval
        self._max_keys = max_keys
        self._batches: dict[tuple[str, str | None], _AccessBatch] = {}
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self.dropped = 0

    def add(self, entity: str, key: Any, on_behalf_of: str | None = None) -> None:
        """Note one read of `entity` `key` (for a calling service, if any); cheap, no I/O."""
        batch = self._batches.get((entity, on_behalf_of))
        if batch is None:
            batch = self._batches[(entity, on_behalf_of)] = _AccessBatch(first_at=time.time())
        batch.keys.add(str(key))
        batch.reads += 1
        batch.last_at = time.time()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="access-log")
        if len(batch.keys) >= self._max_keys:
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._interval)
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write the buffered reads as access events now."""
        if not self._batches:
            return
        batches, self._batches = self._batches, {}
        try:
            async with self._engine.begin() as conn:
                await conn.run_sync(lambda c: record_access(
                    c, self._service, {k: b.as_data(k[1]) for k, b in batches.items()}))
        except Exception as exc:  # best-effort: a failed access batch must not break reads
            self.dropped += sum(b.reads for b in batches.values())
            log.warning("access events dropped: %s", exc)

    async def close(self) -> None:
        """Flush what is buffered and stop the background task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()


@dataclass
class _AccessBatch:
    first_at: float
    last_at: float = 0.0
    reads: int = 0
    keys: set[str] = field(default_factory=set)

    def as_data(self, on_behalf_of: str | None) -> dict[str, Any]:
        return {
            "first_at": datetime.fromtimestamp(self.first_at, timezone.utc),
            "last_at": int(self.last_at * 1_000_000),
            "reads": self.reads,
            "keys": sorted(self.keys),
            "on_behalf_of": on_behalf_of,
        }


_ACCESS = text("""
INSERT INTO outbox (topic, entity, schema_version, key, op, service, sequence, occurred_at, data)
VALUES (:topic, :entity, 1, :entity, 'read', :service, 0, :first_at, CAST(:data AS json))""")


def record_access(conn: Connection, service: str,
                  batches: dict[tuple[str, str | None], dict[str, Any]]) -> None:
    """Write one `access-v1` outbox row per entity read (and service it was read for)."""
    conn.execute(_ACCESS, [
        {"topic": ACCESS_TOPIC, "entity": entity, "service": service,
         "first_at": batch.pop("first_at"), "data": json.dumps(batch)}
        for (entity, _), batch in batches.items()
    ])
