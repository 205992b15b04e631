"""POST /v1/responses (OpenAI's Responses API) and GET /v1/responses/{id}: run as a chat completion
(responses_protocol.py translates both ways), streamed as the typed events the official client expects."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from hfbridge.server.chat_outputs import ChatOutputs
from hfbridge.server.errors import error_body, read_json_object, to_api_error
from hfbridge.server.generation import collect, new_response_id, start
from hfbridge.server.protocol import parse_chat_request
from hfbridge.server.responses_protocol import (
    ResponseStore,
    StoredResponse,
    call_item,
    chat_body,
    history_messages,
    message_item,
    new_id,
    output_items,
    output_text,
    reasoning_item,
    response_object,
)
from hfbridge.server.routes_chat import prepare_chat, with_tools
from hfbridge.server.state import STATE

RESPONSES = web.AppKey("responses", ResponseStore)


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    store = request.app[RESPONSES]
    raw = await read_json_object(request)
    chat, conversation = chat_body(raw, store)
    body = parse_chat_request(chat)
    model = state.resolve_model(body.model)
    _, card = state.require_engine()
    body, plan = with_tools(state, body)
    prepared = await prepare_chat(state, card, body, "max_output_tokens")
    response_id = new_response_id("resp", body, request)
    merger = await start(state, response_id, [prepared], body)
    async with merger.outputs() as outputs:
        if body.stream:
            return await _stream(request, outputs, merger, response_id, raw, model, plan.outputs, conversation, store)
        choices, _ = await collect(outputs, 1)
    choice = choices[0]
    fields, _ = plan.outputs.message(choice.text, choice.finish_reason)
    items = output_items(fields)
    response = response_object(response_id, raw, model, items, merger.usage.as_dict(), "completed",
                               choice.finish_reason)
    _store(store, raw, response, conversation, items)
    return web.json_response(response)


async def get_response(request: web.Request) -> web.Response:
    return web.json_response(request.app[RESPONSES].get(request.match_info["response_id"]).body)


def _store(store: ResponseStore, raw: dict[str, Any], response: dict[str, Any], conversation: list[dict[str, Any]],
           items: list[dict[str, Any]]) -> None:
    if raw.get("store", True) is not False:
        store.put(response["id"], StoredResponse(conversation + history_messages(items), response))


class _Events:
    """Responses' SSE: `event: <type>` and `data: {"type", "sequence_number", ...}`, no [DONE]."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                    "X-Accel-Buffering": "no"})
        self.sequence = 0

    async def send(self, kind: str, **payload: Any) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        data = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        await self.response.write(f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode())


class _ItemWriter:
    """Opens, fills and closes output items as the parsed deltas arrive: reasoning, message text, calls."""

    def __init__(self, events: _Events):
        self.events = events
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being written

    async def reasoning(self, text: str) -> None:
        item = await self._ensure("reasoning", lambda: reasoning_item(new_id("rs"), "", "in_progress"))
        item["content"][0]["text"] += text
        await self.events.send("response.reasoning_text.delta", item_id=item["id"], output_index=len(self.items) - 1,
                               content_index=0, delta=text)

    async def text(self, text: str) -> None:
        item = await self._ensure("message", lambda: message_item(new_id("msg"), None, "in_progress"))
        if not item["content"]:
            item["content"].append(output_text(""))
            await self.events.send("response.content_part.added", item_id=item["id"],
                                   output_index=len(self.items) - 1, content_index=0, part=output_text(""))
        item["content"][0]["text"] += text
        await self.events.send("response.output_text.delta", item_id=item["id"], output_index=len(self.items) - 1,
                               content_index=0, delta=text, logprobs=[])

    async def call(self, call_id: str, name: str) -> None:
        await self.close()
        self.open = call_item(new_id("fc"), call_id, name, "", "in_progress")
        await self._add(self.open)

    async def arguments(self, fragment: str) -> None:
        self.open["arguments"] += fragment
        await self.events.send("response.function_call_arguments.delta", item_id=self.open["id"],
                               output_index=len(self.items) - 1, delta=fragment)

    async def close(self) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        index = len(self.items) - 1
        if item["type"] == "reasoning":
            await self.events.send("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=item["content"][0]["text"])
        elif item["type"] == "message":
            part = item["content"][0]
            await self.events.send("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=[])
            await self.events.send("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part)
        else:
            await self.events.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"])
        item["status"] = "completed"
        await self.events.send("response.output_item.done", output_index=index, item=item)

    async def _ensure(self, kind: str, make) -> dict[str, Any]:
        if self.open is None or self.open["type"] != kind:
            await self.close()
            self.open = make()
            await self._add(self.open)
        return self.open

    async def _add(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        await self.events.send("response.output_item.added", output_index=len(self.items) - 1,
                               item=json.loads(json.dumps(item)))


async def _stream(request, outputs, merger, response_id: str, raw: dict[str, Any], model: str, parsed: ChatOutputs,
                  conversation: list[dict[str, Any]], store: ResponseStore) -> web.StreamResponse:
    events = _Events(request)
    writer = _ItemWriter(events)
    try:
        await events.send("response.created", response=response_object(response_id, raw, model, [], None,
                                                                         "in_progress"))
        await events.send("response.in_progress", response=response_object(response_id, raw, model, [], None,
                                                                             "in_progress"))
        finish_reason = None
        async for _, output in outputs:
            for completion in output.outputs:
                finished = completion.finish_reason is not None
                for delta in parsed.deltas(0, completion.text, finished):
                    if delta.get("reasoning"):
                        await writer.reasoning(delta["reasoning"])
                    if delta.get("content"):
                        await writer.text(delta["content"])
                    for call in delta.get("tool_calls", []):
                        if "id" in call:
                            await writer.call(call["id"], call["function"]["name"])
                        elif call["function"].get("arguments"):
                            await writer.arguments(call["function"]["arguments"])
                finish_reason = completion.finish_reason or finish_reason
        await writer.close()
        response = response_object(response_id, raw, model, writer.items, merger.usage.as_dict(), "completed",
                                   finish_reason)
        _store(store, raw, response, conversation, writer.items)
        await events.send("response.incomplete" if response["status"] == "incomplete" else "response.completed",
                          response=response)
    except Exception as e:  # noqa: BLE001 - reported as the stream's error event, or raised before it opened
        transport = request.transport
        if transport is None or transport.is_closing():
            return events.response
        if not events.response.prepared:
            raise
        error = to_api_error(e)
        await events.send("error", **error_body(error.status, error.message, error.param)["error"])
    await events.response.write_eof()
    return events.response


def add_routes(app: web.Application) -> None:
    app[RESPONSES] = ResponseStore()
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
