"""The HTTP handlers on the worker's Faust web server: `install` mounts them, `WebHandlers` dispatches.

Endpoints (JSON unless a browser asks for HTML; every error is JSON `{"error": ...}`):

- `GET /tables/`: every view table: kind, visible key count, changelog topic and the
  changelog partitions this worker holds (active and standby) (`app.web.tables`).
- `GET /tables/<name>/?limit=N&after=KEY&prefix=P`: the visible items of the partitions this
  worker owns, sorted by key, `limit` 1..1000 (default 50), `after` = the `next` cursor of
  the previous page, `prefix` filters keys. HTML when `Accept` prefers text/html (or
  `format=html`; `app.web.pages`).
- `GET /tables/<name>/<key>/[?max_lag=N]`: one key, answered by the worker that owns the key's
  partition, or by a local copy at most N changelog messages behind (`app.web.routing`,
  `app.web.staleness`).
- `GET /entities/<entity>/<key>/`: the entity's current state through the Redis read-through
  repository, sensitive columns excluded (`app.web.entities`).

Keys, names, cursors and prefixes are at most 200 characters of `[A-Za-z0-9._:-]`; anything
else, malformed or non-UTF-8 percent-escapes, unknown or repeated query parameters, and
non-integer or out-of-range `limit`/`max_lag` are answered with 400 naming the parameter
(`app.web.params`).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import faust
from faust.web import Request, Response
from faust.web import View as FaustView

from app.settings import Settings
from app.web.entities import EntityReads
from app.web.errors import guarded
from app.web.params import check_key, parse_int, parse_query, path_segments
from app.web.routing import MAX_LAG_DIGITS, KeyLookups
from app.web.staleness import Staleness
from app.web.tables import TableReads, View

if TYPE_CHECKING:
    from app.cache import CacheResource

__all__ = ["install", "WebHandlers"]

Handler = Callable[[FaustView, Request], Awaitable[Response]]


class WebHandlers:
    """The handlers behind `/tables/` and `/entities/`, and the resources they hold."""

    def __init__(self, app: faust.App, settings: Settings, views: Mapping[str, View],
                 cache: CacheResource | None = None) -> None:
        """Handlers for `views` on `app`, entities through `cache`; nothing is connected until
        a request needs it."""
        self.reads = TableReads(app, settings, views)
        self.lookups = KeyLookups(app, self.reads, Staleness(app))
        self.entity_reads = EntityReads(app, settings, cache)

    async def dispatch(self, endpoint: FaustView, request: Request, handler: Handler) -> Response:
        """Run a handler; HttpError becomes its JSON answer, anything else a bare 500."""
        return await guarded(endpoint, request, lambda: handler(endpoint, request))

    async def tables(self, endpoint: FaustView, request: Request) -> Response:
        """`/tables/`, `/tables/<name>/`, `/tables/<name>/<key>/`."""
        segments = path_segments(request.rel_url.raw_path, "/tables", ("name", "key"))
        if not segments:
            query = parse_query(request.rel_url.raw_query_string, ("format",))
            return self.reads.index(endpoint, request, query)
        name = check_key(segments[0], "name")
        view = self.reads.view_or_404(name)
        if len(segments) == 1:
            query = parse_query(request.rel_url.raw_query_string, ("limit", "after", "prefix", "format"))
            return self.reads.listing(endpoint, request, name, view, query)
        key = check_key(segments[1], "key")
        query = parse_query(request.rel_url.raw_query_string, ("max_lag",))
        max_lag = None
        if "max_lag" in query:
            max_lag = parse_int(query["max_lag"], "max_lag", 0, None, MAX_LAG_DIGITS)
        return await self.lookups.lookup(endpoint, request, name, view, key, max_lag)

    async def entities(self, endpoint: FaustView, request: Request) -> Response:
        """`/entities/` and `/entities/<entity>/<key>/` (`EntityReads.entities`)."""
        return await self.entity_reads.entities(endpoint, request)


def install(app: faust.App, settings: Settings, views: Mapping[str, View],
            cache: CacheResource | None) -> WebHandlers:
    """Serve `views` and the entities (through `cache`) on the worker's web server; returns
    the handlers."""
    handlers = WebHandlers(app, settings, views, cache)
    for view in views.values():
        handlers.lookups.staleness.watch(view.table)

    # One catch-all route per prefix: paths are parsed from the raw request target here, so
    # every malformed path gets a JSON answer instead of aiohttp's text 404.
    @app.page("/tables{tail:[\\s\\S]*}", name="mse-tables")
    class Tables(FaustView):
        """Materialized-view tables."""

        async def get(self, request: Request, **_: Any) -> Response:
            """Dispatch to `WebHandlers.tables`."""
            return await handlers.dispatch(self, request, handlers.tables)

    @app.page("/entities{tail:[\\s\\S]*}", name="mse-entities")
    class Entities(FaustView):
        """Current entity state for request/response callers."""

        async def get(self, request: Request, **_: Any) -> Response:
            """Dispatch to `WebHandlers.entities`."""
            return await handlers.dispatch(self, request, handlers.entities)

    return handlers
