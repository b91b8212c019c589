"""Reading the materialized-view tables for the web: `/tables/` and `/tables/<name>/`.

A worker lists only the keys of the changelog partitions it owns (standby copies are listed by
their owner), sorted by key (numeric keys numerically, first) and paged by key cursor.
Windowed tables (a `window_count` aggregation) show each window's start and end.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import faust
from aiokafka.partitioner import DefaultPartitioner
from faust.web import Request, Response
from faust.web import View as FaustView
from yarl import URL

from app.settings import Settings
from app.web.errors import HttpError
from app.web.pages import render_index, render_listing
from app.web.params import check_key, parse_int, wants_html

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


@dataclass
class View:
    """A table as the web layer shows it."""

    table: faust.Table
    kind: str
    present: Any  # stored value -> what readers see (None: hidden)
    #: Window size in seconds when the keys are window starts (epoch seconds).
    window: int | None = None


@dataclass(frozen=True)
class Page:
    """One page of a table's items."""

    items: list[tuple[str, Any]]
    next: str | None


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


class TableReads:
    """The view tables as this worker holds them: partitions, visible items, pages."""

    def __init__(self, app: faust.App, settings: Settings, views: Mapping[str, View]) -> None:
        """Reads of `views` on `app`."""
        self.app = app
        self.settings = settings
        self.views = dict(views)
        self._partition_cache: dict[str, dict[str, int]] = {}

    def canonical(self) -> URL:
        """This worker's canonical URL (what the assignor hands out for its partitions)."""
        return URL(str(self.app.conf.canonical_url))

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

    def item_json(self, view: View, key: str, value: Any) -> dict[str, Any]:
        """One item of `view` as JSON, with its window for windowed tables."""
        out: dict[str, Any] = {"key": key, "value": value}
        size = view.window
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

    def index(self, endpoint: FaustView, request: Request, query: Mapping[str, str]) -> Response:
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
        if wants_html(request.headers.get("Accept", ""), query):
            return endpoint.html(render_index(body))
        return endpoint.json(body)

    def listing(self, endpoint: FaustView, request: Request, name: str, view: View,
                query: Mapping[str, str]) -> Response:
        """One page of a table's items."""
        limit = DEFAULT_LIMIT
        if "limit" in query:
            limit = parse_int(query["limit"], "limit", 1, MAX_LIMIT, 4)
        after = check_key(query["after"], "after") if query.get("after") else None
        prefix = check_key(query["prefix"], "prefix") if query.get("prefix") else ""
        html_wanted = wants_html(request.headers.get("Accept", ""), query)
        page = self.page(view, limit, prefix, after)
        active, standby = self.held(view)
        body = {
            "table": name, "kind": view.kind, "worker": str(self.canonical()),
            "partitions": {"active": active, "standby": standby},
            "limit": limit, "after": after, "prefix": prefix or None,
            "items": [self.item_json(view, key, value) for key, value in page.items],
            "next": page.next,
        }
        if html_wanted:
            return endpoint.html(render_listing(body, windowed=view.window is not None))
        return endpoint.json(body)
