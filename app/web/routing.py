"""Key lookups (`/tables/<name>/<key>/`): answered by the worker that owns the key's partition.

Other workers forward the request to the owner. When the owner is unknown (rebalancing),
unreachable, or is this worker while it rebalances, the answer is 503 unless `max_lag` is
given: then the local copy answers if its estimated lag is at most N changelog messages
(`app.web.staleness`). Response headers: `X-Served-By` (`active`: the owner's table;
`standby`: a local copy that may be stale), `X-Standby-Lag` (with `standby`), `X-Worker` (the
canonical URL of the worker whose table answered).
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import faust
from faust.types import TP
from faust.web import Request, Response
from faust.web import View as FaustView
from yarl import URL

from app.web.errors import HttpError
from app.web.staleness import Staleness
from app.web.tables import TableReads, View

log = logging.getLogger(__name__)

# max_lag is a message count: 18 digits is beyond any changelog and keeps int() cheap.
MAX_LAG_DIGITS = 18
# A dead owner refuses connections at once; a hung one must not hold the caller longer.
FORWARD_TIMEOUT = 2.0
# Set on forwarded lookups: the receiver answers itself instead of forwarding again, so two
# workers with different ideas of the assignment (mid-rebalance) cannot bounce a request.
ROUTED_HEADER = "X-Table-Routed-From"
SERVED_BY = "X-Served-By"
STANDBY_LAG = "X-Standby-Lag"
WORKER = "X-Worker"
PASSED_THROUGH = (SERVED_BY, STANDBY_LAG, WORKER)


class KeyLookups:
    """One key's value: from this worker's table, its owner's, or an accepted local copy."""

    def __init__(self, app: faust.App, reads: TableReads, staleness: Staleness) -> None:
        """Lookups of `reads`' tables on `app`, judging local copies with `staleness`."""
        self.app = app
        self.reads = reads
        self.staleness = staleness

    def is_self(self, url: URL) -> bool:
        """Whether `url` names this worker (host and port, as Faust's router compares)."""
        mine = self.reads.canonical()
        return (url.host, url.port or 80) == (mine.host, mine.port or 80)

    async def lookup(self, endpoint: FaustView, request: Request, name: str, view: View, key: str,
                     max_lag: int | None) -> Response:
        """A key's value from its owner; from the local copy when allowed and fresh enough."""
        tp = TP(self.reads.changelog(view), self.reads.partition_of(view, key))
        try:
            owner: URL | None = self.app.router.key_store(name, key)
        except Exception:  # KeyError: no owner known (Faust answers 503 ServiceUnavailable)
            owner = None
        if owner is not None and self.is_self(owner):
            if self.staleness.rebalancing():
                return self.from_copy(endpoint, name, view, key, tp, max_lag,
                                      "this worker is rebalancing: its copy of the partition may be behind")
            return self.answer(endpoint, name, view, key, {SERVED_BY: "active"})
        if owner is None:
            return self.from_copy(endpoint, name, view, key, tp, max_lag,
                                  "the owner of the key's partition is unknown (rebalancing)")
        if request.headers.get(ROUTED_HEADER):
            return self.from_copy(endpoint, name, view, key, tp, max_lag,
                                  "workers disagree on the owner of the key's partition (rebalancing)")
        forwarded = await self.forward(endpoint, owner, request)
        if forwarded is not None:
            return forwarded
        return self.from_copy(endpoint, name, view, key, tp, max_lag,
                              f"the owner of the key's partition ({owner}) cannot be reached")

    def answer(self, endpoint: FaustView, name: str, view: View, key: str,
               headers: dict[str, str]) -> Response:
        """The local table's value of `key` (404 if absent or hidden)."""
        headers = {**headers, WORKER: str(self.reads.canonical())}
        stored = view.table.data.get(key)
        value = None if stored is None else view.present(stored)
        if value is None:
            raise HttpError(404, "key not found", headers, table=name, key=key)
        return endpoint.json({"table": name, **self.reads.item_json(view, key, value)}, headers=headers)

    def from_copy(self, endpoint: FaustView, name: str, view: View, key: str, tp: TP,
                  max_lag: int | None, reason: str) -> Response:
        """The local copy's answer if the caller accepts it and it is fresh enough; else 503."""
        retry = {"Retry-After": "1"}
        if max_lag is None:
            raise HttpError(503, reason, retry, table=name, key=key,
                            hint="pass max_lag=N to accept a local copy at most N changelog messages behind")
        self.staleness.apply_received(view.table)
        lag = self.staleness.lag(view.table, tp)
        if lag is None:
            raise HttpError(503, f"{reason}; this worker keeps no copy of partition {tp.partition}",
                            retry, table=name, key=key)
        if lag > max_lag:
            raise HttpError(503, f"{reason}; the local copy is {lag} changelog messages behind",
                            retry, table=name, key=key, lag=lag, max_lag=max_lag)
        return self.answer(endpoint, name, view, key, {SERVED_BY: "standby", STANDBY_LAG: str(lag)})

    async def forward(self, endpoint: FaustView, owner: URL, request: Request) -> Response | None:
        """The owner's answer to the same request; None if the owner cannot be reached."""
        # Our own forwarding rather than Faust's route_req: it keeps the owner's headers,
        # bounds the wait, and marks the request so it is never forwarded twice.
        target = URL(f"{owner.scheme or 'http'}://{owner.host}:{owner.port or 80}"
                     f"{request.rel_url.raw_path_qs}", encoded=True)
        headers = {"Accept": "application/json", ROUTED_HEADER: str(self.reads.canonical())}
        try:
            async with self.app.http_client.get(
                    target, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)) as response:
                body = await response.read()
                passed = {h: response.headers[h] for h in PASSED_THROUGH if h in response.headers}
                return endpoint.bytes(body, content_type=response.content_type,
                                       status=response.status, headers=passed)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.info("web: owner %s unreachable for %s: %r", owner, request.rel_url.raw_path, exc)
            return None
