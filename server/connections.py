"""What happens on a connection before a handler runs: the keep-alive and header-read timeouts, `Expect:
100-continue`, and HTTP parser errors, answered in OpenAI's error shape like every other error.

aiohttp closes an idle connection after its keep-alive timeout (counted from the connection's start and from each
response); a request head that trickles in is bounded here too, from its first byte. Parser errors (a bad chunk
size, a control byte in a header) never reach the app's middlewares: the protocol answers them, so this is where
they get the JSON shape."""
from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler

from hfbridge.server.errors import error_body, error_response
from hfbridge.server.state import STATE

logger = logging.getLogger(__name__)


class ServerRunner(web.AppRunner):
    """An AppRunner whose connections speak ServerProtocol; kwargs as AppRunner's (keepalive_timeout, ...)."""

    def __init__(self, app: web.Application, *, header_read_timeout: float, **kwargs: Any):
        super().__init__(app, **kwargs)
        self.header_read_timeout = header_read_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ProtocolServer  # the same server, with our protocol as its connection factory
        server.header_read_timeout = self.header_read_timeout
        return server


class _ProtocolServer(web.Server):
    header_read_timeout: float

    def __call__(self) -> RequestHandler:
        return ServerProtocol(self, loop=self._loop, header_read_timeout=self.header_read_timeout, **self._kwargs)


class ServerProtocol(RequestHandler):
    """aiohttp's protocol, with a deadline on request heads and JSON error bodies for what its parser refuses."""

    def __init__(self, manager: web.Server, *, header_read_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_read_timeout = header_read_timeout
        self._head_deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        num_heads = self._request_count
        super().data_received(data)
        if self._request_count > num_heads or self._request_in_progress:
            self._cancel_head_deadline()  # a head is complete: its request runs under the handler's limits
        elif data and self._head_deadline is None and self.transport is not None:  # a head began, not complete
            self._head_deadline = self._loop.call_later(self._header_read_timeout, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport is None or self._request_in_progress:
            return
        body = json.dumps(error_body(408, f"The request head did not arrive within {self._header_read_timeout:g} s"))
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own errors (a malformed request, an exception outside the app's middlewares) as JSON."""
        if status >= 500:
            logger.error("Request from %s failed outside the app: %s: %s", request.remote, type(exc).__name__, exc)
            logger.debug("Request from %s failed outside the app", request.remote, exc_info=exc)
        else:
            logger.debug("Refused a malformed request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:  # aiohttp's rule: a response already started cannot be replaced
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        text = HTTPStatus(status).phrase if status >= 500 or not message else f"Malformed HTTP request: {message}"
        response = error_response(status, text[:500])
        response.force_close()
        return response


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` is answered before the body is sent: at once with a 413 when the announced body is over
    the limit (the client then never sends it), else with 100 Continue."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        return error_response(417, f"Unknown Expect: {expect[:100]}")
    limit = request.app[STATE].body_limit
    if request.content_length is not None and request.content_length > limit:
        response = error_response(413, f"The request body ({request.content_length} bytes) is larger than the limit of "
                                       f"{limit} bytes (raise the limit with --max-request-body-bytes)")
        response.force_close()
        return response
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


def add_post(app: web.Application, path: str, handler: Any) -> None:
    """A POST route whose `Expect: 100-continue` is checked against the body limit first."""
    app.router.add_post(path, handler, expect_handler=expect_continue)
