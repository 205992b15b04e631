"""Bearer-token auth that denies by default: with a key set, every route needs it except the probes that
load balancers and orchestrators call without credentials (vLLM guards only /v1 and leaves /tokenize,
/metrics, ... open; that is its complaint #6)."""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from hfbridge.server.errors import error_response

OPEN_PATHS = frozenset({"/health", "/ping", "/ready", "/readyz", "/version"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def make_auth_middleware(api_keys: Sequence[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    # Compare fixed-length digests in constant time, and always against every key, so neither the length of
    # a key nor which key matched shows in the timing.
    digests = [_digest(k) for k in api_keys]

    @web.middleware
    async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        presented = _digest(token.strip()) if scheme.lower() == "bearer" else b""
        matched = False
        for digest in digests:
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            message = "Invalid API key" if presented else "Missing API key: send 'Authorization: Bearer <key>'"
            return error_response(401, message, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth_middleware
