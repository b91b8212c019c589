"""Public methods of owner services over HTTP: the only way another service reads sensitive data.

The customers service owns `Customer.email`. Other services ask it for a customer's contact
at `GET /services/customers/customers/<id>/contact`, authenticated with a per-service bearer
token (`SERVICE_TOKENS="orders:<token>,support:<token>"`); the method lists which services
may call it (`CONTACT_READERS`). The owner reads with its own evented session, on behalf of
the caller, so the access events say who the data was read for. In this repository the demo
mounts these routes on the worker's web server.
"""
from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from typing import Any

import faust
from faust.web import Request, Response
from faust.web import View as FaustView

from app.settings import Settings
from app.web.errors import guarded

OWNER = "customers"
CUSTOMER_ID = re.compile(r"[0-9]{1,18}\Z")
CONTACT_PATH = re.compile(r"/services/customers/customers/(?P<id>[^/]*)/contact/?\Z")


class AuthError(Exception):
    """A request without a valid token (401) or from a service not allowed (403)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


def caller_of(authorization: str | None, tokens: Mapping[str, str]) -> str:
    """The calling service named by a `Bearer` token; AuthError(401) otherwise (pure)."""
    if not authorization:
        raise AuthError(401, "missing Authorization: Bearer <service token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "Authorization must be 'Bearer <service token>'")
    token = token.strip()
    for service, expected in tokens.items():
        if hmac.compare_digest(token.encode(), expected.encode()):
            return service
    raise AuthError(401, "unknown service token")


def authorize(caller: str, allowed: frozenset[str], method: str) -> None:
    """AuthError(403) unless `caller` may call `method` (pure)."""
    if caller not in allowed:
        raise AuthError(403, f"service {caller!r} may not call {method}")


class OwnerApi:
    """The customers service's public methods, reading through its own evented Database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = settings.service_token_map()
        self.contact_readers = frozenset(settings.contact_readers.split(",")) - {""}
        self._db: Any = None

    @property
    def db(self) -> Any:
        """The owner's Database, opened on first use."""
        if self._db is None:
            from app.orm import Database
            self._db = Database(self.settings.database_url_for(OWNER), service=OWNER)
        return self._db

    async def contact(self, request: Request, customer_id: str) -> tuple[int, dict[str, Any]]:
        """A customer's contact (name, email) for an authorized service."""
        try:
            caller = caller_of(request.headers.get("Authorization"), self.tokens)
            authorize(caller, self.contact_readers, "customer contact")
        except AuthError as exc:
            return exc.status, {"error": exc.error}
        if not CUSTOMER_ID.match(customer_id):
            return 400, {"error": "customer id must be 1 to 18 digits"}
        from models import Customer

        async with self.db.session(on_behalf_of=caller) as s:
            customer = await s.get(Customer, int(customer_id))
            if customer is None:
                return 404, {"error": f"no customer {customer_id}"}
            return 200, {"id": customer.id, "name": customer.name, "email": customer.email}

    async def close(self) -> None:
        """Close the owner's database pool."""
        if self._db is not None:
            await self._db.close()
            self._db = None


def install(app: faust.App, settings: Settings) -> OwnerApi:
    """Mount the owner's public methods on the worker's web server."""
    api = OwnerApi(settings)

    # A catch-all route: aiohttp's own 404 for odd paths would be text, not a JSON error.
    @app.page("/services{tail:[\\s\\S]*}", name="mse-owner-methods")
    class OwnerMethods(FaustView):
        """GET a customer's contact; bearer token of an allowed service required."""

        async def get(self, request: Request, **_: Any) -> Response:
            async def answer() -> Response:
                match = CONTACT_PATH.match(request.path)
                if match is None:
                    status, body = 404, {"error": "no such method"}
                else:
                    status, body = await api.contact(request, match["id"])
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return self.json(body, status=status, headers=headers)
            # An unexpected error is a bare 500, never a traceback to a caller.
            return await guarded(self, request, answer, "services")

    return api
