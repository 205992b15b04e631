"""Server-sent events as OpenAI streams them: `data: <json>` events, always closed by `data: [DONE]`."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from hfbridge.server.errors import error_body, request_log_id, to_api_error


class EventStream:
    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx would otherwise buffer the whole stream
            },
        )

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, payload: dict[str, Any]) -> None:
        # A client that went away makes this raise (ConnectionResetError); the caller then calls fail().
        await self.response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    async def fail(self, error: Exception) -> web.StreamResponse:
        """End the stream after `error`, the handler's response. A client that left gets nothing more: the
        response is returned as it stands, so aiohttp logs the access and ends quietly (raising would log a server
        error), and leaving the handler's output guard aborts its requests. Before the stream opened, `error`
        propagates (the error middleware answers it). Else an `error` event (the HTTP status, 200, is already
        sent), then [DONE] as usual."""
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return self.response
        if not self.response.prepared:
            raise error
        api_error = to_api_error(error, request_log_id(self.request))
        await self.send(error_body(api_error.status, api_error.message, api_error.param))
        return await self.close()

    async def close(self) -> web.StreamResponse:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
