"""One error shape for every failure, from day one: {"error": {"message", "type", "param", "code"}}.

Bad input is always a 400 (never 422, never 500); the middleware below is the single place that turns
exceptions into responses, so no handler can leak a traceback or a 200 on failure.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from hfbridge.errors import ValidationError

logger = logging.getLogger(__name__)

# HTTP status -> the `type` vLLM (and the openai client's exception names) use for it.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    417: "ExpectationFailedError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error a handler wants the client to see, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers  # e.g. Retry-After on a 503 for a full queue

    @classmethod
    def from_validation(cls, error: ValidationError | ValueError) -> APIError:
        # The message alone: ValidationError's str() appends "(parameter=..., value=...)", which could echo a
        # huge input back; `param` already names the field.
        message = error.args[0] if error.args else str(error)
        return cls(400, str(message), getattr(error, "parameter", None))


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, **kwargs: Any) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status, **kwargs)


@dataclass
class _LogId:
    value: str | None = None


# aiohttp's per-request storage key of the id that joins a request's log lines. It holds a mutable _LogId, set before
# the handler runs: a middleware may hand the handler a clone of the request, whose storage is a shallow copy.
LOG_ID = web.RequestKey("hfbridge_log_id", _LogId) if hasattr(web, "RequestKey") else "hfbridge_log_id"


def set_request_log_id(request: web.Request, log_id: str) -> None:
    """Handlers that make an id (a response id, which prefixes its engine request ids) log under it."""
    _log_id_of(request).value = log_id


def request_log_id(request: web.Request) -> str:
    """The id a request's log lines share: the one its handler set, else its X-Request-Id, else a new one.
    Printable ASCII only: a client's id must not forge log lines."""
    holder = _log_id_of(request)
    if holder.value is None:
        holder.value = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    return ascii(holder.value)[1:-1][:200]


def _log_id_of(request: web.Request) -> _LogId:
    holder = request.get(LOG_ID)
    if holder is None:
        holder = request[LOG_ID] = _LogId()
    return holder


def to_api_error(error: BaseException, log_id: str | None = None) -> APIError:
    """The APIError a client sees for any exception (used for JSON errors and mid-stream SSE errors alike). A
    server fault logs one ERROR line (the request's id, the exception) and its traceback at DEBUG, joined by the id."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValidationError):
        return APIError.from_validation(error)
    from hfbridge.engine.async_engine import EngineDeadError

    if isinstance(error, RecursionError):  # deeply nested input reached a recursive helper
        return APIError(400, "The request is nested too deeply")
    if isinstance(error, (HttpProcessingError, RequestPayloadError)):  # a bad gzip/deflate body, a bad chunk
        cause = error if isinstance(error, HttpProcessingError) else error.__cause__
        detail = str(getattr(cause, "message", None) or error).strip()
        return APIError(400, f"The request body could not be read: {detail}")
    if isinstance(error, EngineDeadError):
        return APIError(503, f"The engine is not running: {error}")
    log_id = log_id or uuid.uuid4().hex
    logger.error("Request %s failed: %s: %s", log_id, type(error).__name__, str(error)[:500])
    logger.debug("Request %s failed", log_id, exc_info=error)
    return APIError(500, f"Internal server error ({type(error).__name__}); see the server log for request {log_id}")


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    request[LOG_ID] = _LogId()  # before the handler, which may see a clone of the request
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # aiohttp's own refusals (unknown route, wrong method, body too large) get our shape too.
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else f"{e.reason}: {request.path}"
        if isinstance(e, web.HTTPRequestEntityTooLarge):
            message = f"{e.text} (raise the limit with --max-request-body-bytes)"
        if isinstance(e, web.HTTPMethodNotAllowed):
            message = f"Method {request.method} is not allowed for {request.path}"
        return error_response(e.status, message, headers=_allow_header(e))
    except Exception as e:  # noqa: BLE001 - this is the boundary that keeps tracebacks out of responses
        api_error = to_api_error(e, request_log_id(request))
        return error_response(api_error.status, api_error.message, api_error.param, headers=api_error.headers)


def _allow_header(e: web.HTTPException) -> dict[str, str] | None:
    allow = e.headers.get("Allow")
    return {"Allow": allow} if allow else None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 for anything else. The Content-Type is not checked: `curl -d`
    sends form encoding by default, and a body that parses as JSON is what matters."""
    raw = await request.read()
    if not raw.strip():
        raise APIError(400, "The request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"Malformed JSON body: {e}") from e
    except RecursionError as e:  # 100,000 nested lists: the parser's recursion limit, not a server fault
        raise APIError(400, "The JSON body is nested too deeply") from e
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_no_lone_surrogate(body)
    return body


# Raw UTF-8 cannot hold a surrogate; only a `\uD800`-style escape can, so only such bodies are walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_no_lone_surrogate(body: Any) -> None:
    """A lone UTF-16 surrogate ("a\\ud800b") is valid JSON but no text: tokenizers raise on it (a 500 before)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, "The JSON body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                            "which is not valid text") from e
    except RecursionError as e:
        raise APIError(400, "The JSON body is nested too deeply") from e
