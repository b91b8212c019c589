"""The one error format of every HTTP answer, and the one guard every page handler runs in.

JSON `{"error": ..., "status": ...}` for API clients, a small HTML page for browsers (`Accept`
ranking text/html first: `prefers_html`, which the table pages use too), never an echo of the
input. A handler raises `HttpError` for an error answer; `guarded` turns it into its JSON answer
and any other exception into a bare 500 `{"error": "internal error"}`, the traceback logged
here and never sent to the caller. `app.web.http` applies the same format to what aiohttp
itself refuses.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web

from app.errors import EventsError

if TYPE_CHECKING:
    from faust.web import Request, Response
    from faust.web import View as FaustView

log = logging.getLogger(__name__)


def prefers_html(accept: str) -> bool:
    """Whether an `Accept` header ranks text/html above application/json (ties: JSON)."""
    ranges: list[tuple[str, str, float]] = []
    for part in accept.split(","):
        media, *params = part.strip().split(";")
        if "/" not in media:
            continue
        kind, _, sub = media.strip().lower().partition("/")
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((kind, sub, q))

    def quality(kind: str, sub: str) -> float:
        """The q-value the header gives `kind/sub`."""
        # The most specific matching range decides (RFC 9110 12.5.1).
        best, specificity = 0.0, -1
        for rk, rs, q in ranges:
            if rk == kind and rs == sub:
                level = 2
            elif rk == kind and rs == "*":
                level = 1
            elif rk == "*" and rs == "*":
                level = 0
            else:
                continue
            if level > specificity:
                best, specificity = q, level
        return best

    return quality("text", "html") > quality("application", "json")


def error_body(status: int, error: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON of an error: what went wrong, in words, and the status."""
    return {"error": error, "status": status, **(extra or {})}


def error_html(status: int, body: dict[str, Any]) -> str:
    """A small HTML page for a browser showing the same error."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th>"
                   f"<td>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
                   for k, v in body.items() if k not in ("error", "status"))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{status} {phrase}</title>'
            '<style>body{font:15px/1.5 system-ui,sans-serif;margin:40px;color:#1f2328}'
            'h1{font-size:22px}th{text-align:left;padding-right:12px;color:#57606a}</style></head><body>'
            f"<h1>{status} {html.escape(phrase)}</h1><p>{html.escape(str(body.get('error', '')))}</p>"
            f"{'<table>' + rows + '</table>' if rows else ''}"
            '<p><a href="/tables/">tables</a> · <a href="/status">status</a></p></body></html>')


def error_response(status: int, body: dict[str, Any], accept: str, headers: dict[str, str] | None = None
                   ) -> web.Response:
    """`body` as JSON, or as an HTML page when `accept` prefers it."""
    if prefers_html(accept):
        return web.Response(status=status, text=error_html(status, body), content_type="text/html",
                            headers=headers)
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


class HttpError(EventsError):
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


async def guarded(endpoint: FaustView, request: Request, answer: Callable[[], Awaitable[Response]],
                  where: str = "web") -> Response:
    """`answer()`; an HttpError becomes its JSON answer, anything else a bare 500 logged as `where`."""
    try:
        return await answer()
    except HttpError as exc:
        return endpoint.json(exc.body(), status=exc.status, headers=exc.headers or None)
    except asyncio.CancelledError:
        raise
    except Exception:
        # Logged here with the traceback; the caller gets none of it.
        log.exception("%s: %s %s failed", where, request.method, request.rel_url.raw_path)
        return endpoint.json({"error": "internal error"}, status=500)
