"""Web views over the materialized-view tables and the entity cache, on the worker's Faust web server.

Endpoints (JSON unless a browser asks for HTML; every error is JSON `{"error": ...}`):

- `GET /tables/`: every view table: kind, visible key count, changelog topic and the
  changelog partitions this worker holds (active and standby).
- `GET /tables/<name>/?limit=N&after=KEY&prefix=P`: the visible items of the partitions this
  worker owns, sorted by key (numeric keys numerically, first), `limit` 1..1000 (default 50),
  `after` = the `next` cursor of the previous page, `prefix` filters keys. HTML when `Accept`
  prefers text/html (or `format=html`). Windowed tables (`orders_per_minute`) show each
  window's start and end.
- `GET /tables/<name>/<key>/[?max_lag=N]`: one key, answered by the worker that owns the key's
  partition (others forward the request). When the owner is unknown (rebalancing),
  unreachable, or is this worker while it rebalances, the answer is 503 unless `max_lag` is
  given: then the local copy answers if its estimated lag is at most N changelog messages,
  with `X-Served-By: standby` and `X-Standby-Lag: <messages>` (see `Staleness`).
- `GET /entities/<entity>/<key>/`: the entity's current state through the Redis read-through
  repository (`app.cache`; the worker's `app.entity_cache` when it has one), sensitive
  columns excluded.

Response headers of key lookups: `X-Served-By` (`active`: the owner's table; `standby`: a
local copy that may be stale), `X-Standby-Lag` (with `standby`), `X-Worker` (the canonical URL
of the worker whose table answered).

Keys, names, cursors and prefixes are at most 200 characters of `[A-Za-z0-9._:-]`; anything
else, malformed or non-UTF-8 percent-escapes, unknown or repeated query parameters, and
non-integer or out-of-range `limit`/`max_lag` are answered with 400 naming the parameter.
"""
from __future__ import annotations

import asyncio
import heapq
import html
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import aiohttp
import faust
from aiokafka.partitioner import DefaultPartitioner  # type: ignore[import-untyped]
from faust.stores.memory import Store as MemoryStore
from faust.tables.recovery import Recovery
from faust.types import TP
from faust.web import Request, Response
from faust.web import View as FaustView
from mode import Service
from sqlalchemy import BigInteger, Integer, SmallInteger
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DataError, SQLAlchemyError
from yarl import URL

from agents.views import View
from app.web.http import prefers_html
from app.capture.roles import WORKER as WORKER_ROLE
from app.settings import Settings
from app.views import MINUTE

if TYPE_CHECKING:
    from app.cache import CacheRepository
    from app.capture import Database, EventedBase

log = logging.getLogger(__name__)

__all__ = ["install", "WebViews", "Staleness", "HttpError", "prefers_html", "order_key"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_KEY_LENGTH = 200
# max_lag is a message count: 18 digits is beyond any changelog and keeps int() cheap.
MAX_LAG_DIGITS = 18
KEY_CHARS = re.compile(r"[A-Za-z0-9._:-]+\Z")
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A dead owner refuses connections at once; a hung one must not hold the caller longer.
FORWARD_TIMEOUT = 2.0
# Set on forwarded lookups: the receiver answers itself instead of forwarding again, so two
# workers with different ideas of the assignment (mid-rebalance) cannot bounce a request.
ROUTED_HEADER = "X-Table-Routed-From"
SERVED_BY = "X-Served-By"
STANDBY_LAG = "X-Standby-Lag"
WORKER = "X-Worker"
PASSED_THROUGH = (SERVED_BY, STANDBY_LAG, WORKER)
#: Tables whose keys are window starts (epoch seconds), with their window size in seconds.
WINDOWS = {"orders_per_minute": MINUTE}
#: Key column types whose keys must be integers, with their ranges.
INT_RANGES: tuple[tuple[type, int], ...] = ((BigInteger, 63), (SmallInteger, 15), (Integer, 31))


class HttpError(Exception):
    """An error answer: status, message and extra JSON fields."""

    def __init__(self, status: int, error: str, headers: Mapping[str, str] | None = None,
                 **extra: Any) -> None:
        """An answer with `status`, JSON `{"error": error, **extra}` and `headers`."""
        super().__init__(error)
        self.status, self.error, self.headers, self.extra = status, error, dict(headers or {}), extra

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"error": self.error, **self.extra}


def bad(param: str, problem: str) -> HttpError:
    """A 400 naming the parameter at fault."""
    return HttpError(400, f"{param}: {problem}", parameter=param)


# -- request parsing -----------------------------------------------------------------------

def decode_component(raw: str, param: str) -> str:
    """A percent-encoded path segment or query item as text; 400 if malformed or not UTF-8."""
    if BAD_ESCAPE.search(raw):
        raise bad(param, "malformed percent-escape")
    # unquote_to_bytes, not unquote: unquote would turn invalid UTF-8 into U+FFFD silently.
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise bad(param, "percent-escapes are not UTF-8") from None


def check_key(value: str, param: str) -> str:
    """`value` if it is a well-formed key (also used for names, cursors and prefixes)."""
    if not value:
        raise bad(param, "empty")
    if len(value) > MAX_KEY_LENGTH:
        raise bad(param, f"longer than {MAX_KEY_LENGTH} characters")
    if CONTROL.search(value):
        raise bad(param, "contains control characters")
    if not KEY_CHARS.match(value):
        raise bad(param, "only the characters A-Z a-z 0-9 . _ : - are allowed")
    return value


def parse_int(value: str, param: str, minimum: int, maximum: int | None, digits: int) -> int:
    """A decimal integer parameter within [minimum, maximum]; 400 otherwise."""
    if not value.isascii() or not value.isdigit():
        raise bad(param, "not a non-negative integer")
    if len(value.lstrip("0")) > digits:
        raise bad(param, "too large")
    number = int(value)
    if number < minimum:
        raise bad(param, f"must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise bad(param, f"must be at most {maximum}")
    return number


def parse_query(raw: str, allowed: Iterable[str]) -> dict[str, str]:
    """The query string as name -> value; 400 on unknown, repeated or undecodable parameters."""
    names = set(allowed)
    out: dict[str, str] = {}
    for item in raw.split("&"):
        if not item:
            continue
        raw_name, _, raw_value = item.partition("=")
        name = decode_component(raw_name.replace("+", " "), "query")
        if name not in names:
            raise bad(name[:40], f"unknown parameter (allowed: {', '.join(sorted(names)) or 'none'})")
        if name in out:
            raise bad(name, "given more than once")
        out[name] = decode_component(raw_value.replace("+", " "), name)
    return out


def path_segments(raw_path: str, prefix: str, names: tuple[str, ...]) -> list[str]:
    """The decoded segments after `prefix` (at most len(names)); trailing slash optional."""
    rest = raw_path[len(prefix):]
    if rest in ("", "/"):
        return []
    if not rest.startswith("/"):
        raise HttpError(404, "not found")
    parts = rest[1:].split("/")
    if parts[-1] == "":
        parts.pop()
    if len(parts) > len(names):
        raise HttpError(404, "not found")
    return [decode_component(part, name) for part, name in zip(parts, names[:len(parts)], strict=True)]


def order_key(key: str) -> tuple[int, int, str]:
    """Sort order of keys: ASCII-numeric keys numerically and first, then the rest as text."""
    if key.isascii() and key.isdigit():
        return (0, int(key), key)
    return (1, 0, key)


def window_of(key: str, size: int) -> dict[str, str] | None:
    """Start and end (ISO 8601, UTC) of the window starting at epoch second `key`."""
    try:
        start = int(key)
        return {"start": iso(start), "end": iso(start + size)}
    except (ValueError, OverflowError, OSError):
        return None


def iso(seconds: float) -> str:
    """Epoch seconds as ISO 8601 in UTC."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


# -- staleness of local copies -------------------------------------------------------------

class Staleness:
    """Estimates how many changelog messages a local copy of a table partition is behind.

    How good the estimate is:
    - "behind" is `end - applied`: `end` is the changelog's last offset as this worker knows
      it (the high watermark of the consumer's latest fetch of that partition, or the one
      Faust's recovery measured when the partition was assigned, whichever is larger);
      `applied` is the last offset Faust's recovery received for the partition, after the
      events it still buffers (`standby_buffer_size`, 1000 by default) have been applied.
      Offsets count messages, including ones compaction later removes, so the figure is an
      upper bound in that respect. Tansu reports a high watermark at the start of the last
      batch, so the end can be under-estimated by up to one producer batch. While the owner
      is alive the end moves on, so the figure is as old as the last fetch (milliseconds);
      after the owner died nobody writes the partition until it is reassigned, so the end
      is final.
    - With the in-memory store Faust drops every key of a standby partition it applied from
      the changelog when a recovery completes (`faust/stores/memory.py`,
      `on_recovery_completed`) and keeps reading from where it was: the copy then lacks
      whatever came before. Every message up to that point is counted as missing, which
      over-states the lag of keys written later but never under-states it. RocksDB stores
      keep their standby keys and are not penalised.
    - For a partition this worker owns while it rebalances, the figure is the recovery's
      remaining count once it is measured; before that, or for a partition kept through the
      rebalance, it also counts the worker's own writes since its last recovery (too high).
    - A partition this worker neither stands by for nor owns has no estimate (None).
    """

    def __init__(self, app: faust.App) -> None:
        """Estimates for `app`'s tables."""
        self.app = app
        # Changelog partition -> last offset applied before Faust purged the memory copy.
        self._purged: dict[TP, int] = {}

    @property
    def recovery(self) -> Recovery:
        """Faust's changelog recovery service: it tracks offsets of actives and standbys."""
        return self.app.tables.recovery  # type: ignore[attr-defined]  # TableManager has it, not TableManagerT

    def watch(self, table: faust.Table) -> None:
        """Record, after each recovery, what Faust purged from `table`'s memory standbys."""

        async def purged() -> None:
            """Note the standby offsets up to which the memory store just dropped keys."""
            recovery = self.recovery
            standbys = set(recovery.standbys_for_table.get(table, ()))
            for tp in [tp for tp in self._purged if tp.topic == table.changelog_topic.get_topic_name()]:
                if tp not in standbys:
                    del self._purged[tp]
            if not isinstance(table.data, MemoryStore):
                return
            for tp in standbys:
                offset = recovery.standby_offsets.get(tp)
                self._purged[tp] = -1 if offset is None else offset

        table.on_recover(purged)

    def apply_received(self, table: faust.Table) -> None:
        """Apply changelog events Faust received for `table` but still buffers."""
        if self.app.conf.web_in_thread:
            return  # the web server runs in another thread: Faust's state is not ours to touch
        buffer = self.recovery.buffers.get(table)
        if buffer:
            # The same step Faust takes when a buffer fills up or partitions are revoked.
            table.apply_changelog_batch(buffer)
            buffer.clear()

    def lag(self, table: faust.Table, tp: TP) -> int | None:
        """Estimated changelog messages the local copy of `tp` is behind; None if unknown."""
        recovery = self.recovery
        if tp in recovery.standby_tps:
            applied, measured = recovery.standby_offsets.get(tp), recovery.standby_highwaters.get(tp)
        elif tp in recovery.active_tps:
            # Active offsets advance only while recovering: a partition kept through the
            # rebalance counts its own writes since the last recovery too (an over-estimate).
            applied, measured = recovery.active_offsets.get(tp), recovery.active_highwaters.get(tp)
        else:
            return None
        applied = -1 if applied is None else applied
        ends = [end for end in (measured, self.fetched_end(tp)) if end is not None]
        end = max(ends, default=applied)
        pending = sum(1 for event in recovery.buffers.get(table, ()) if event.message.tp == tp)
        purged = self._purged.get(tp, -1) + 1 if tp in recovery.standby_tps else 0
        return max(0, end - applied) + pending + purged

    def rebalancing(self) -> bool:
        """Whether this worker is between losing its partitions and having recovered the new ones."""
        # Faust's own route_req answers from the table then too; its copy may be incomplete.
        return bool(getattr(self.app, "rebalancing", False)) or self.recovery.in_recovery

    def fetched_end(self, tp: TP) -> int | None:
        """Last offset of `tp` per the consumer's latest fetch (no network); None if unknown."""
        try:
            highwater = self.app.consumer.highwater(tp)
        except Exception:  # not assigned (mid-rebalance) or consumer not started
            return None
        return None if highwater is None else highwater - 1


# -- the views -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    """One page of a table's items."""

    items: list[tuple[str, Any]]
    next: str | None


class WebViews:
    """The handlers behind `/tables/` and `/entities/`, and the resources they hold."""

    def __init__(self, app: faust.App, settings: Settings, views: Mapping[str, View]) -> None:
        """Handlers for `views` on `app`; nothing is connected until a request needs it."""
        self.app = app
        self.settings = settings
        self.views = dict(views)
        self.staleness = Staleness(app)
        self._partition_cache: dict[str, dict[str, int]] = {}
        self._repository: CacheRepository | None = None
        self._repository_lock: asyncio.Lock | None = None
        self._db: Database | None = None

    # ---- plumbing

    async def dispatch(self, view: FaustView, request: Request, handler: Callable[..., Any]) -> Response:
        """Run a handler; HttpError becomes its JSON answer, anything else a bare 500."""
        try:
            return await handler(view, request)
        except HttpError as exc:
            return view.json(exc.body(), status=exc.status, headers=exc.headers or None)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Logged here with the traceback; the caller gets none of it.
            log.exception("web: %s %s failed", request.method, request.rel_url.raw_path)
            return view.json({"error": "internal error"}, status=500)

    def canonical(self) -> URL:
        """This worker's canonical URL (what the assignor hands out for its partitions)."""
        return URL(str(self.app.conf.canonical_url))

    def is_self(self, url: URL) -> bool:
        """Whether `url` names this worker (host and port, as Faust's router compares)."""
        mine = self.canonical()
        return (url.host, url.port or 80) == (mine.host, mine.port or 80)

    def changelog(self, view: View) -> str:
        """The changelog topic of a view's table."""
        return view.table.changelog_topic.get_topic_name()

    def partition_of(self, view: View, key: str) -> int:
        """The changelog partition of `key`: the producer's partitioner over the raw key bytes."""
        topic = self.changelog(view)
        cache = self._partition_cache.setdefault(topic, {})
        partition = cache.get(key)
        if partition is None:
            count = view.table.partitions or self.settings.topic_partitions
            partitioner: Callable[[bytes, list[int], list[int]], int] = (
                getattr(self.app.conf, "producer_partitioner", None) or DefaultPartitioner())
            everything = list(range(count))
            partition = partitioner(key.encode(), everything, everything)
            if len(cache) > 1_000_000:
                cache.clear()  # bounded: recomputing is cheap, keeping every key forever is not
            cache[key] = partition
        return partition

    def held(self, view: View) -> tuple[list[int], list[int]]:
        """The changelog partitions of a view this worker holds: (active, standby)."""
        topic = self.changelog(view)
        assignor = self.app.assignor
        active = sorted(tp.partition for tp in assignor.assigned_actives() if tp.topic == topic)
        standby = sorted(tp.partition for tp in assignor.assigned_standbys() if tp.topic == topic)
        return active, standby

    def visible(self, view: View, active: set[int], prefix: str = "",
                after: str | None = None) -> Iterator[tuple[str, Any]]:
        """(key, presented value) of the active partitions' keys, hidden values skipped."""
        floor = order_key(after) if after is not None else None
        # list(): a snapshot, so agents changing the table between pages cannot break iteration.
        for key, stored in list(view.table.data.items()):
            if not isinstance(key, str) or stored is None or not key.startswith(prefix):
                continue
            if floor is not None and order_key(key) <= floor:
                continue
            if self.partition_of(view, key) not in active:
                continue  # a standby or stale copy: the owner lists it
            value = view.present(stored)
            if value is not None:
                yield key, value

    def page(self, view: View, limit: int, prefix: str, after: str | None) -> Page:
        """The first `limit` visible items after `after`, and the cursor of the next page."""
        active = set(self.held(view)[0])
        items = heapq.nsmallest(limit + 1, self.visible(view, active, prefix, after),
                                key=lambda item: order_key(item[0]))
        if len(items) > limit:
            return Page(items[:limit], items[limit - 1][0])
        return Page(items, None)

    def item_json(self, name: str, key: str, value: Any) -> dict[str, Any]:
        """One item as JSON, with its window for windowed tables."""
        out: dict[str, Any] = {"key": key, "value": value}
        size = WINDOWS.get(name)
        if size is not None:
            window = window_of(key, size)
            if window is not None:
                out["window"] = window
        return out

    def view_or_404(self, name: str) -> View:
        """The view called `name`."""
        view = self.views.get(name)
        if view is None:
            raise HttpError(404, "unknown table", table=name)
        return view

    # ---- /tables/

    async def tables(self, page_view: FaustView, request: Request) -> Response:
        """`/tables/`, `/tables/<name>/`, `/tables/<name>/<key>/`."""
        segments = path_segments(request.rel_url.raw_path, "/tables", ("name", "key"))
        if not segments:
            query = parse_query(request.rel_url.raw_query_string, ("format",))
            return self.index(page_view, request, query)
        name = check_key(segments[0], "name")
        view = self.view_or_404(name)
        if len(segments) == 1:
            query = parse_query(request.rel_url.raw_query_string, ("limit", "after", "prefix", "format"))
            return self.listing(page_view, request, name, view, query)
        key = check_key(segments[1], "key")
        query = parse_query(request.rel_url.raw_query_string, ("max_lag",))
        max_lag = None
        if "max_lag" in query:
            max_lag = parse_int(query["max_lag"], "max_lag", 0, None, MAX_LAG_DIGITS)
        return await self.lookup(page_view, request, name, view, key, max_lag)

    def wants_html(self, request: Request, query: Mapping[str, str]) -> bool:
        """HTML or JSON: `format` decides, else the `Accept` header."""
        fmt = query.get("format")
        if fmt is not None:
            if fmt not in ("html", "json"):
                raise bad("format", "must be html or json")
            return fmt == "html"
        return prefers_html(request.headers.get("Accept", ""))

    def index(self, page_view: FaustView, request: Request, query: Mapping[str, str]) -> Response:
        """Every view table with its kind, key count and partitions held here."""
        tables = []
        for name, view in self.views.items():
            active, standby = self.held(view)
            tables.append({
                "name": name, "kind": view.kind,
                "keys": sum(1 for _ in self.visible(view, set(active))),
                "changelog": self.changelog(view),
                "partitions": {"active": active, "standby": standby},
                "url": f"/tables/{name}/",
            })
        body = {"worker": str(self.canonical()), "tables": tables}
        if self.wants_html(request, query):
            return page_view.html(render_index(body))
        return page_view.json(body)

    def listing(self, page_view: FaustView, request: Request, name: str, view: View,
                query: Mapping[str, str]) -> Response:
        """One page of a table's items."""
        limit = DEFAULT_LIMIT
        if "limit" in query:
            limit = parse_int(query["limit"], "limit", 1, MAX_LIMIT, 4)
        after = check_key(query["after"], "after") if query.get("after") else None
        prefix = check_key(query["prefix"], "prefix") if query.get("prefix") else ""
        html_wanted = self.wants_html(request, query)
        page = self.page(view, limit, prefix, after)
        active, standby = self.held(view)
        body = {
            "table": name, "kind": view.kind, "worker": str(self.canonical()),
            "partitions": {"active": active, "standby": standby},
            "limit": limit, "after": after, "prefix": prefix or None,
            "items": [self.item_json(name, key, value) for key, value in page.items],
            "next": page.next,
        }
        if html_wanted:
            return page_view.html(render_listing(body, windowed=name in WINDOWS))
        return page_view.json(body)

    # ---- /tables/<name>/<key>/

    async def lookup(self, page_view: FaustView, request: Request, name: str, view: View, key: str,
                     max_lag: int | None) -> Response:
        """A key's value from its owner; from the local copy when allowed and fresh enough."""
        tp = TP(self.changelog(view), self.partition_of(view, key))
        try:
            owner: URL | None = self.app.router.key_store(name, key)
        except Exception:  # KeyError: no owner known (Faust answers 503 ServiceUnavailable)
            owner = None
        if owner is not None and self.is_self(owner):
            if self.staleness.rebalancing():
                return self.from_copy(page_view, name, view, key, tp, max_lag,
                                      "this worker is rebalancing: its copy of the partition may be behind")
            return self.answer(page_view, name, view, key, {SERVED_BY: "active"})
        if owner is None:
            return self.from_copy(page_view, name, view, key, tp, max_lag,
                                  "the owner of the key's partition is unknown (rebalancing)")
        if request.headers.get(ROUTED_HEADER):
            return self.from_copy(page_view, name, view, key, tp, max_lag,
                                  "workers disagree on the owner of the key's partition (rebalancing)")
        forwarded = await self.forward(page_view, owner, request)
        if forwarded is not None:
            return forwarded
        return self.from_copy(page_view, name, view, key, tp, max_lag,
                              f"the owner of the key's partition ({owner}) cannot be reached")

    def answer(self, page_view: FaustView, name: str, view: View, key: str,
               headers: dict[str, str]) -> Response:
        """The local table's value of `key` (404 if absent or hidden)."""
        headers = {**headers, WORKER: str(self.canonical())}
        stored = view.table.data.get(key)
        value = None if stored is None else view.present(stored)
        if value is None:
            raise HttpError(404, "key not found", headers, table=name, key=key)
        return page_view.json({"table": name, **self.item_json(name, key, value)}, headers=headers)

    def from_copy(self, page_view: FaustView, name: str, view: View, key: str, tp: TP,
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
        return self.answer(page_view, name, view, key, {SERVED_BY: "standby", STANDBY_LAG: str(lag)})

    async def forward(self, page_view: FaustView, owner: URL, request: Request) -> Response | None:
        """The owner's answer to the same request; None if the owner cannot be reached."""
        # Our own forwarding rather than Faust's route_req: it keeps the owner's headers,
        # bounds the wait, and marks the request so it is never forwarded twice.
        target = URL(f"{owner.scheme or 'http'}://{owner.host}:{owner.port or 80}"
                     f"{request.rel_url.raw_path_qs}", encoded=True)
        headers = {"Accept": "application/json", ROUTED_HEADER: str(self.canonical())}
        try:
            async with self.app.http_client.get(
                    target, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)) as response:
                body = await response.read()
                passed = {h: response.headers[h] for h in PASSED_THROUGH if h in response.headers}
                return page_view.bytes(body, content_type=response.content_type,
                                       status=response.status, headers=passed)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.info("web: owner %s unreachable for %s: %r", owner, request.rel_url.raw_path, exc)
            return None

    # ---- /entities/

    async def entities(self, page_view: FaustView, request: Request) -> Response:
        """`/entities/` (the entity names) and `/entities/<entity>/<key>/`."""
        segments = path_segments(request.rel_url.raw_path, "/entities", ("entity", "key"))
        parse_query(request.rel_url.raw_query_string, ())
        models = self.models()
        if not segments:
            return page_view.json({"entities": sorted(models)})
        entity = check_key(segments[0], "entity")
        model = models.get(entity)
        if model is None:
            raise HttpError(404, "unknown entity", entity=entity)
        if len(segments) == 1:
            raise HttpError(404, "not found: use /entities/<entity>/<key>/", entity=entity)
        key = check_entity_key(model, check_key(segments[1], "key"))
        repository = await self.repository()
        try:
            state = await repository.get(model, key)
        except DataError:
            raise bad("key", f"not a valid key of {entity}") from None
        except (SQLAlchemyError, OSError, asyncio.TimeoutError) as exc:
            log.warning("web: entity read %s/%s failed: %r", entity, key, exc)
            raise HttpError(503, "entity store unavailable", {"Retry-After": "1"}, entity=entity, key=key) from None
        if state is None:
            raise HttpError(404, "entity not found", entity=entity, key=key)
        return page_view.json({"entity": entity, "key": key, "state": state})

    def models(self) -> dict[str, type[EventedBase]]:
        """Entity name -> root model."""
        from app.topology import root_models

        return {model.__entity__: model for model in root_models()}

    @property
    def opened_repository(self) -> CacheRepository | None:
        """This endpoint's own repository if it opened one (for metrics scrapes), else None."""
        return self._repository

    async def repository(self) -> CacheRepository:
        """The worker's cache repository (`app.entity_cache`), else one of ours, connected on first use."""
        shared = getattr(self.app, "entity_cache", None)
        if shared is not None:
            # One Redis client and pool per worker, and its in-flight loads are shared too.
            return shared.repo  # type: ignore[no-any-return]
        if self._repository is not None:
            return self._repository
        if not self.settings.redis_url or not self.settings.database_url:
            raise HttpError(503, "entity reads need REDIS_URL and DATABASE_URL")
        if self._repository_lock is None:
            self._repository_lock = asyncio.Lock()
        async with self._repository_lock:
            if self._repository is None:
                # Imported here: only this endpoint needs Redis and a database pool.
                from app.cache import CacheRepository, connect_redis
                from app.capture import Database

                # Repository reads are plain SQL, not ORM reads: no access log to run.
                self._db = Database(self.settings.database_url_for(WORKER_ROLE),
                                    service=self.settings.service_name, pool_size=5, record_reads=False)
                self._repository = CacheRepository(connect_redis(self.settings.redis_url), self._db)
        return self._repository

    async def close(self) -> None:
        """Close the repository's Redis client and database pool, if they were opened."""
        repository, db = self._repository, self._db
        self._repository = self._db = None
        if repository is not None:
            await repository.redis.aclose()
        if db is not None:
            await db.close()


def check_entity_key(model: type[EventedBase], key: str) -> str:
    """`key` if it fits the type of the model's key column (integers in range)."""
    columns = sa_inspect(model).primary_key
    if len(columns) != 1:
        return key
    column_type = columns[0].type
    for kind, bits in INT_RANGES:
        if isinstance(column_type, kind):
            body = key[1:] if key.startswith("-") else key
            if not body.isascii() or not body.isdigit():
                raise bad("key", f"must be an integer for {model.__entity__}")
            if not -(2 ** bits) <= int(key) < 2 ** bits:
                raise bad("key", "out of range")
            return key
    return key


# -- registration --------------------------------------------------------------------------

def install(app: faust.App, settings: Settings) -> WebViews:
    """Serve `app.views` and the entities on the worker's web server; returns the handlers."""
    views: Mapping[str, View] = app.views  # type: ignore[attr-defined]  # set by app.main
    handlers = WebViews(app, settings, views)
    for view in views.values():
        handlers.staleness.watch(view.table)

    # One catch-all route per prefix: paths are parsed from the raw request target here, so
    # every malformed path gets a JSON answer instead of aiohttp's text 404.
    @app.page("/tables{tail:[\\s\\S]*}", name="mse-tables")
    class Tables(FaustView):
        """Materialized-view tables."""

        async def get(self, request: Request, **_: Any) -> Response:
            """Dispatch to `WebViews.tables`."""
            return await handlers.dispatch(self, request, handlers.tables)

    @app.page("/entities{tail:[\\s\\S]*}", name="mse-entities")
    class Entities(FaustView):
        """Current entity state for request/response callers."""

        async def get(self, request: Request, **_: Any) -> Response:
            """Dispatch to `WebViews.entities`."""
            return await handlers.dispatch(self, request, handlers.entities)

    @app.service
    class WebResources(Service):
        """Closes what the web views opened when the worker stops."""

        async def on_stop(self) -> None:
            """Close the repository if the web views opened one."""
            await handlers.close()

    return handlers


# -- HTML ----------------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1f2328; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header a { color: #9ecbff; text-decoration: none; }
header p { margin: 4px 0 0; color: #d0d7de; font-size: 13px; }
main { padding: 16px 24px 32px; }
.meta { color: #57606a; margin: 0 0 12px; }
form { display: flex; gap: 8px; align-items: center; margin: 0 0 12px; flex-wrap: wrap; }
input { font: inherit; padding: 4px 8px; border: 1px solid #d0d7de; border-radius: 6px; }
button { font: inherit; padding: 4px 12px; border: 1px solid #1f883d; border-radius: 6px;
         background: #1f883d; color: #fff; cursor: pointer; }
table { border-collapse: collapse; background: #fff; border: 1px solid #d0d7de; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; font-weight: 600; }
tr:nth-child(even) td { background: #fbfcfd; }
td.key, td.num, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
td.num { text-align: right; }
td.ts { white-space: nowrap; }
.muted { color: #8c959f; }
nav { margin-top: 12px; display: flex; gap: 16px; }
nav a, td a { color: #0969da; text-decoration: none; }
.empty { padding: 24px; text-align: center; color: #57606a; background: #fff; border: 1px solid #d0d7de; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def page_html(title: str, subtitle: str, body: str) -> str:
    """A complete page: inline CSS only, nothing fetched from elsewhere."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f'<header><h1><a href="/tables/">tables</a> / {esc(title)}</h1><p>{esc(subtitle)}</p></header>'
            f"<main>{body}</main></body></html>")


def cell(name: str, value: Any) -> str:
    """One table cell: numbers right-aligned, `*_at` microsecond timestamps as UTC times."""
    if value is None:
        return '<td class="muted">—</td>'
    if isinstance(value, bool):
        return f"<td>{esc(value)}</td>"
    if isinstance(value, int) and name.endswith("_at") and value > 10 ** 14:
        try:
            shown = datetime.fromtimestamp(value / 1_000_000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f'<td class="ts" title="{esc(value)}">{esc(shown)}</td>'
        except (OverflowError, OSError, ValueError):
            pass
    if isinstance(value, (int, float)):
        return f'<td class="num">{esc(value)}</td>'
    if isinstance(value, dict):
        # Nested records (an order's shipping) as "field: value" lines; JSON for deeper values.
        lines = [f'<span class="muted">{esc(k)}:</span> {esc(v if isinstance(v, (str, int, float)) else json.dumps(v))}'
                 for k, v in value.items() if v is not None]
        if not lines:
            return '<td class="muted">—</td>'
        return f"<td>{'<br>'.join(lines)}</td>"
    if isinstance(value, list):
        return f"<td><code>{esc(json.dumps(value))}</code></td>"
    return f"<td>{esc(value)}</td>"


def render_index(body: Mapping[str, Any]) -> str:
    """The HTML of `/tables/`."""
    rows = []
    for table in body["tables"]:
        parts = table["partitions"]
        rows.append(
            f'<tr><td class="key"><a href="{esc(table["url"])}">{esc(table["name"])}</a></td>'
            f'<td>{esc(table["kind"])}</td><td class="num">{esc(table["keys"])}</td>'
            f'<td class="key">{esc(", ".join(map(str, parts["active"])) or "—")}</td>'
            f'<td class="key">{esc(", ".join(map(str, parts["standby"])) or "—")}</td></tr>')
    content = ("<table><thead><tr><th>table</th><th>kind</th><th>keys</th><th>active partitions</th>"
               f"<th>standby partitions</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return page_html("all", f"materialized views on worker {body['worker']}", content)


def render_listing(body: Mapping[str, Any], windowed: bool) -> str:
    """The HTML of `/tables/<name>/`."""
    name, items = body["table"], body["items"]
    values = [item["value"] for item in items]
    columns: list[str] = []
    if values and all(isinstance(v, dict) for v in values):
        for value in values:
            columns.extend(k for k in value if k not in columns)
    head = ["key"] + (["window start", "window end"] if windowed else []) + (columns or ["value"])
    rows = []
    for item in items:
        cells = [f'<td class="key">{esc(item["key"])}</td>']
        if windowed:
            window = item.get("window") or {}
            cells += [f"<td>{esc(window.get('start', '—'))}</td>", f"<td>{esc(window.get('end', '—'))}</td>"]
        if columns:
            cells += [cell(c, item["value"].get(c)) for c in columns]
        else:
            cells.append(cell("value", item["value"]))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    parts = body["partitions"]
    meta = (f'<p class="meta">{len(items)} item(s) on this page, sorted by key · active partitions '
            f'{esc(", ".join(map(str, parts["active"])) or "none")} · standby '
            f'{esc(", ".join(map(str, parts["standby"])) or "none")} · worker {esc(body["worker"])}</p>')
    form = (f'<form method="get" action="/tables/{esc(name)}/">'
            f'<label>key prefix <input name="prefix" value="{esc(body["prefix"] or "")}" size="16"></label>'
            f'<label>per page <input name="limit" value="{esc(body["limit"])}" size="5"></label>'
            f"<button type=\"submit\">show</button></form>")
    if rows:
        grid = (f"<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")
    else:
        grid = '<div class="empty">no items</div>'
    links = [f'<a href="/tables/{esc(name)}/?{esc(query(body, after=None))}">first page</a>']
    if body["next"] is not None:
        links.append(f'<a href="/tables/{esc(name)}/?{esc(query(body, after=body["next"]))}">next page →</a>')
    links.append(f'<a href="/tables/{esc(name)}/?{esc(query(body, after=body["after"], fmt="json"))}">JSON</a>')
    return page_html(name, body["kind"], f"{meta}{form}{grid}<nav>{''.join(links)}</nav>")


def query(body: Mapping[str, Any], after: str | None, fmt: str | None = None) -> str:
    """The query string of a listing link (values are already restricted to safe characters)."""
    params = [f"limit={body['limit']}"]
    if body["prefix"]:
        params.append(f"prefix={body['prefix']}")
    if after:
        params.append(f"after={after}")
    if fmt:
        params.append(f"format={fmt}")
    return "&".join(params)
