"""TLS and CORS with vLLM's flags (--ssl-keyfile, --ssl-certfile, --ssl-ca-certs, --ssl-cert-reqs;
--allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials) and vLLM's defaults.

CORS follows the semantics of Starlette's CORSMiddleware, which vLLM mounts: preflights (OPTIONS with
Access-Control-Request-Method) are answered here, before authentication (browsers send them without
credentials); every other response from an allowed origin carries Access-Control-Allow-Origin.
"""
from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from hfbridge.server.errors import error_response

_SIMPLE_HEADERS = ("accept", "accept-language", "content-language", "content-type")
_ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
PREFLIGHT_MAX_AGE = 600  # Starlette's default


@dataclass(frozen=True)
class CorsSettings:
    allowed_origins: tuple[str, ...] = ("*",)  # vLLM's defaults: every origin, method and header
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins

    def allow_origin_value(self, origin: str) -> str:
        # With credentials a browser refuses "*": the origin itself is echoed (as Starlette does).
        if "*" in self.allowed_origins and not self.allow_credentials:
            return "*"
        return origin


def build_ssl_context(certfile: str | None, keyfile: str | None, ca_certs: str | None = None,
                      cert_reqs: int = ssl.CERT_NONE) -> ssl.SSLContext | None:
    """The server's TLS context; None without --ssl-certfile. A key without a certificate is an error, never
    a silent fall back to plain HTTP."""
    if certfile is None:
        if keyfile is not None or ca_certs is not None:
            raise ValueError("--ssl-keyfile and --ssl-ca-certs need --ssl-certfile (the server's certificate)")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)  # keyfile None: the key is in the certificate file
    if ca_certs is not None:
        context.load_verify_locations(cafile=ca_certs)
    context.verify_mode = ssl.VerifyMode(cert_reqs)  # vLLM's --ssl-cert-reqs: 0 none, 1 optional, 2 required
    return context


def make_cors(settings: CorsSettings) -> tuple[Callable[..., Awaitable[web.StreamResponse]], Callable]:
    """(middleware answering preflights, on_response_prepare hook adding the headers to every response,
    streamed ones included: an SSE response has sent its headers before any middleware could see it)."""

    @web.middleware
    async def cors_preflight(request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            return _preflight(request, origin, settings)
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if not origin or "Access-Control-Allow-Origin" in response.headers or not settings.origin_allowed(origin):
            return
        response.headers["Access-Control-Allow-Origin"] = settings.allow_origin_value(origin)
        if settings.allow_credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        if settings.allow_origin_value(origin) != "*":
            response.headers.add("Vary", "Origin")

    return cors_preflight, add_headers


def _preflight(request: web.Request, origin: str, settings: CorsSettings) -> web.Response:
    method = request.headers["Access-Control-Request-Method"].upper()
    requested = [h.strip().lower() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
                 if h.strip()]
    allowed_headers = {h.lower() for h in settings.allowed_headers} | set(_SIMPLE_HEADERS)
    problems = []
    if not settings.origin_allowed(origin):
        problems.append("origin")
    if "*" not in settings.allowed_methods and method not in {m.upper() for m in settings.allowed_methods}:
        problems.append("method")
    if "*" not in settings.allowed_headers and any(h not in allowed_headers for h in requested):
        problems.append("headers")
    if problems:
        return error_response(400, f"Disallowed CORS {', '.join(problems)}")
    methods = _ALL_METHODS if "*" in settings.allowed_methods else settings.allowed_methods
    headers = {
        "Access-Control-Allow-Origin": settings.allow_origin_value(origin),
        "Access-Control-Allow-Methods": ", ".join(methods),
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE),
        "Vary": "Origin",
    }
    if "*" in settings.allowed_headers:
        headers["Access-Control-Allow-Headers"] = ", ".join(requested) if requested else "*"
    else:
        headers["Access-Control-Allow-Headers"] = ", ".join(sorted(allowed_headers))
    if settings.allow_credentials:
        headers["Access-Control-Allow-Credentials"] = "true"
    return web.Response(status=200, text="OK", headers=headers)
