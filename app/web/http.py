"""The worker's HTTP server, hardened: one error format, bounded read times, bounded connections.

Faust serves its web pages with aiohttp. Left alone, aiohttp answers its own errors (404 and
405 from the router, a malformed request line, headers over 8,190 bytes) in `text/plain`,
echoing part of the request, logs a full traceback for each malformed request, and holds a
connection that sent half its headers open indefinitely (slowloris). Here:

- **One error format** (`app.web.errors.error_response`): JSON `{"error": ..., "status": ...}` for API
  clients, a small HTML page for browsers (`Accept` ranking text/html first: `prefers_html`,
  which the table pages use too), never an echo of the input. `error_middleware` applies it
  to router errors and to the JSON errors our handlers return; `GuardedRequestHandler.handle_error`
  to what aiohttp's parser refuses, logged as one line.
- **Header read time**: a request whose headers are not complete `header_timeout` seconds
  after its first byte (or after the connection opened) gets 408 and the connection closes.
  **Body read time**: the middleware reads a request body within `body_timeout` seconds.
- **Open connections**: past `max_connections`, a new connection gets 503 and is closed.
- **Handler errors**: `app.web.errors` (`HttpError`, `guarded`, and the format itself).

Trap: aiohttp has no public hook for the request handler or its parse errors, so
`GuardedRunner._make_server` builds the server itself with our handler class, and the handler
reads `_messages`, `_request_in_progress` and `_manager._connections`. Checked against aiohttp
3.14.5 (the lock); the hardening tests in `tests/web/test_web.py` fail if a release changes them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from app.faust_compat import set_web_runner
from app.web.errors import error_body, error_response, prefers_html

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: What the first bytes of a refused request may tell about the client: its Accept header.
_ACCEPT = re.compile(rb"\r\naccept[ \t]*:[ \t]*([^\r\n]{0,512})", re.IGNORECASE)
#: Bytes of a request head kept to find its Accept header when the parser refuses it.
_HEAD_KEEP = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """Read-time and connection bounds of the web server."""

    header_timeout: float = 5.0
    body_timeout: float = 10.0
    max_connections: int = 256


def _router_error(exc: web.HTTPException) -> tuple[str, dict[str, Any]]:
    """Words for an aiohttp HTTP exception (no echo of the path or method)."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return "method not allowed", {"allowed": sorted(exc.allowed_methods)}
    if isinstance(exc, web.HTTPNotFound):
        return "not found", {}
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return "request body too large", {}
    return exc.reason.lower() if exc.reason else "error", {}


def error_middleware(limits: Limits) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Reads bodies within `body_timeout` and gives every error response the one format."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        accept = request.headers.get("Accept", "")
        if request.body_exists:
            try:
                await asyncio.wait_for(request.read(), limits.body_timeout)  # cached for the handler
            except asyncio.TimeoutError:
                return error_response(408, error_body(408, f"request body not received within "
                                                           f"{limits.body_timeout:g} s"), accept,
                                      headers={"Connection": "close"})
            except web.HTTPException as exc:
                error, extra = _router_error(exc)
                return error_response(exc.status, error_body(exc.status, error, extra), accept)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            error, extra = _router_error(exc)
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(exc.status, error_body(exc.status, error, extra), accept, headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Faust's own table endpoints forward a key's lookup to the worker owning its partition;
            # that worker is gone (killed, mid-rebalance). A 503 the client can retry, in one log
            # line: a traceback per request cost the survivor of a takeover whole seconds.
            log.warning("web: %s %s: the owner of the key's partition cannot be reached (%s)",
                        request.method, request.path, type(exc).__name__)
            return error_response(503, error_body(503, "the owner of the key's partition cannot be reached; "
                                                       "retry once the group has rebalanced"), accept,
                                  headers={"Retry-After": "1"})
        if (response.status >= 400 and isinstance(response, web.Response) and prefers_html(accept)
                and (response.content_type or "") == "application/json" and response.body is not None):
            # Our handlers answer errors in JSON; a browser gets the same error as a page.
            try:
                body = json.loads(bytes(response.body))  # type: ignore[arg-type]  # a JSON answer's body is bytes, not a Payload
            except ValueError:
                return response
            if isinstance(body, dict) and "error" in body:
                page = error_response(response.status, body, accept)
                for name, value in response.headers.items():
                    if name.lower() not in ("content-type", "content-length"):
                        page.headers[name] = value
                return page
        return response

    return middleware


def _parse_error(exc: BaseException | None) -> str:
    """Words for a request aiohttp's parser refused; never the offending bytes."""
    if isinstance(exc, LineTooLong):
        return "request line or a header is too long"
    name = type(exc).__name__ if exc is not None else ""
    if "Method" in name:
        return "malformed request: unknown method"
    if "StatusLine" in name or "Version" in name:
        return "malformed request line"
    if "Header" in name:
        return "malformed request header"
    return "malformed request"


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with our error format, a header deadline and a connection cap."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._head = bytearray()
        self._head_complete = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection; refuse it past the cap; start the header deadline."""
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager._connections) > self.limits.max_connections:
            log.warning("web: refusing a connection: %d open (HTTP_MAX_CONNECTIONS=%d)",
                        len(manager._connections) - 1, self.limits.max_connections)
            self._answer_and_close(503, "too many open connections; retry later", "Service Unavailable")
            return
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Drop the deadline with the connection."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse as aiohttp does; a complete head ends the deadline, a new request's first byte starts one."""
        idle = not self._messages and not self._request_in_progress
        if idle and self._head_complete:
            # The first bytes of the next request on this connection.
            self._head.clear()
            self._head_complete = False
        if idle and len(self._head) < _HEAD_KEEP:
            self._head += data[:_HEAD_KEEP - len(self._head)]
        super().data_received(data)
        if self._messages:
            # A head parsed (or refused): kept until the next request, for `handle_error`.
            self._disarm()
            self._head_complete = True
        elif data and self._header_timer is None and not self._request_in_progress:
            self._arm()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Refused requests in our format, logged as one line."""
        if status >= 500:
            log.error("web: %s %s failed: %s: %s", request.method, request.path, type(exc).__name__, exc,
                      exc_info=exc)
            error = "internal error"
        else:
            error = _parse_error(exc) if isinstance(exc, HttpProcessingError) or exc is None else "bad request"
            log.warning("web: refused a request from %s: %s (%s)", request.remote, error, type(exc).__name__)
        accept = request.headers.get("Accept", "")
        if not accept:
            found = _ACCEPT.search(bytes(self._head))
            accept = found.group(1).decode("latin-1") if found else ""
        response = error_response(status, error_body(status, error), accept)
        response.force_close()
        return response

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self._loop.call_later(self.limits.header_timeout, self._header_deadline)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        if not self._head:
            # Nothing sent at all: an idle connection, which aiohttp's keep-alive timeout closes.
            self._arm()
            return
        log.warning("web: closing a connection whose request headers took over %g s",
                    self.limits.header_timeout)
        self._answer_and_close(408, f"request headers not received within {self.limits.header_timeout:g} s",
                               "Request Timeout")

    def _answer_and_close(self, status: int, error: str, phrase: str) -> None:
        """Write a complete JSON error response on the raw transport and close it."""
        body = json.dumps(error_body(status, error)).encode()
        head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        transport = self.transport
        if transport is not None:
            transport.write(head + body)
        self.force_close()
        if transport is not None:
            transport.close()


class GuardedServer(Server):
    """aiohttp's low-level server making `GuardedRequestHandler`s."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a `GuardedServer` (aiohttp's `Application._make_handler`, inlined)."""

    def __init__(self, app: web.Application, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> Server:
        app = self._app
        loop = asyncio.get_event_loop()
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        kwargs = dict(self._kwargs)
        kwargs["debug"] = app._debug
        kwargs.setdefault("access_log_class", web.AccessLogger)
        kwargs.update(app._handler_args or {})
        return GuardedServer(app._handle, request_factory=app._make_request, loop=loop, limits=self.limits,
                             **kwargs)


def guard(web_driver: Any, limits: Limits) -> None:
    """Harden a Faust aiohttp web driver before it starts: our runner, middleware and limits."""
    web_driver.web_app.middlewares.append(error_middleware(limits))
    set_web_runner(web_driver, GuardedRunner(web_driver.web_app, limits=limits, access_log=None))
