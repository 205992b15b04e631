"""Server-sent events as OpenAI streams them: `data: <json>` events, always closed by `data: [DONE]`."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from hfbridge.server.errors import error_body, to_api_error


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

    def client_gone(self) -> bool:
        """Whether the client closed its connection. A handler then returns `response` as it stands: aiohttp
        logs the access and ends quietly, where an exception would be logged as a server error."""
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def send(self, payload: dict[str, Any]) -> None:
        # A client that went away makes this raise (ConnectionResetError); see client_gone.
        await self.response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    async def send_error(self, error: BaseException) -> None:
        """A mid-stream failure: an `error` event (the HTTP status is already 200), then [DONE] as usual."""
        api_error = to_api_error(error)
        await self.send(error_body(api_error.status, api_error.message, api_error.param))

    async def close(self) -> web.StreamResponse:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
