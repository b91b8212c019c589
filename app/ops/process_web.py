"""The web server of a process that is not the worker (the relay, an inbox consumer):
`/metrics`, `/health/live`, `/health/ready`, and `/status` (a page refreshing every 2 s) with
its data as `/status.json`, on aiohttp."""
from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: (ready, the JSON body of /health/ready) of the process.
Readiness = Callable[[], tuple[bool, dict[str, Any]]]


def process_web(registry: CollectorRegistry, ready: Readiness,
                status: Callable[[], dict[str, Any]] | None = None) -> web.Application:
    """`/metrics` from `registry`, `/health/live`, `/health/ready` from `ready`, and `/status.json`
    from `status` when given."""

    async def metrics(_: web.Request) -> web.Response:
        # prometheus_client's Content-Type carries a charset parameter, which aiohttp's
        # content_type argument refuses: set the header itself.
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def readiness(_: web.Request) -> web.Response:
        ok, body = ready()
        return web.Response(status=200 if ok else 503, text=json.dumps({"ready": ok, **body}),
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", readiness)
    if status is not None:
        async def status_json(_: web.Request) -> web.Response:
            return web.json_response(status())

        async def status_page(_: web.Request) -> web.Response:
            return web.Response(text=status_html(status()), content_type="text/html")

        app.router.add_get("/status.json", status_json)
        app.router.add_get("/status", status_page)
    return app


def status_html(values: dict[str, Any]) -> str:
    """A small page of `values`, one row each, that reloads itself every 2 s."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th>"
                   f"<td>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
                   for k, v in values.items())
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">'
            '<title>status</title><style>body{font:15px/1.5 system-ui,sans-serif;margin:40px;color:#1f2328}'
            'th{text-align:left;padding-right:16px;color:#57606a}</style></head><body><h1>status</h1>'
            f"<table>{rows}</table></body></html>")


async def start_web(app: web.Application, host: str, port: int, what: str) -> web.AppRunner:
    """Serve `app` on host:port; returns the runner to clean up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("%s web server on http://%s:%d", what, host, port)
    return runner
