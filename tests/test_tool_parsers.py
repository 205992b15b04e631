"""Tool-call and reasoning parsers against text in each model family's documented format (Hermes/Qwen
`<tool_call>` blocks, Llama 3.x JSON, Mistral `[TOOL_CALLS]`, Llama 4 pythonic lists, `<think>` reasoning), and
the streaming contract: however the text is cut into deltas, the streamed parts add up to the non-streamed ones.
Expected values are written from the formats' documentation; arguments are compared as parsed JSON."""
import json

import pytest

from hfbridge.server.chat_outputs import ChatOutputs
from hfbridge.server.reasoning_parsers import REASONING_PARSERS
from hfbridge.server.tool_parsers import TOOL_PARSERS

WEATHER = {"city": "Paris", "unit": "celsius"}
HERMES_ONE = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
HERMES_TWO = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')

CASES = [
    # parser, text, expected content, expected [(name, arguments)]
    ("hermes", "The weather is fine.", "The weather is fine.", []),
    ("hermes", HERMES_ONE, "Let me check.\n", [("get_weather", WEATHER)]),
    ("hermes", HERMES_TWO, None, [("get_weather", WEATHER), ("get_time", {})]),
    ("hermes", '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n', None, [("get_time", {})]),
    ("hermes", "Oops <tool_call>{not json}</tool_call>", "Oops <tool_call>{not json}</tool_call>", []),
    ("hermes", "Cut short <tool_call>{\"name\": \"get_weather\"", "Cut short <tool_call>{\"name\": \"get_weather\"", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {}}', None, [("get_weather", WEATHER), ("get_time", {})]),
    ("llama3_json", "Paris is sunny today.", "Paris is sunny today.", []),
    ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {}}]', None, [("get_weather", WEATHER), ("get_time", {})]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', "Sure. ",
     [("get_weather", WEATHER)]),
    ("mistral", "No tools needed.", "No tools needed.", []),
    ("pythonic", '[get_weather(city="Paris", unit="celsius"), get_time()]', None,
     [("get_weather", WEATHER), ("get_time", {})]),
    ("pythonic", '<|python_start|>[get_weather(city="Paris", unit="celsius")]<|python_end|>', None,
     [("get_weather", WEATHER)]),
    ("pythonic", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    ("pythonic", "It is sunny.", "It is sunny.", []),
]


def outputs_for(parser: str | None, reasoning: str | None = None) -> ChatOutputs:
    return ChatOutputs(REASONING_PARSERS[reasoning]() if reasoning else None,
                       TOOL_PARSERS[parser]() if parser else None)


def calls_of(fields: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in fields.get("tool_calls", [])]


def assemble(deltas: list[dict]) -> dict:
    """A streamed choice put together the way OpenAI clients do it: text concatenated, calls by index."""
    out: dict = {"content": "", "reasoning": "", "calls": {}}
    for delta in deltas:
        out["content"] += delta.get("content", "")
        out["reasoning"] += delta.get("reasoning", "")
        assert delta.get("reasoning") == delta.get("reasoning_content")
        for call in delta.get("tool_calls", []):
            entry = out["calls"].setdefault(call["index"], {"name": "", "arguments": "", "id": None})
            if "id" in call:
                assert entry["id"] is None and call["type"] == "function" and call["function"]["arguments"] == ""
                entry["id"] = call["id"]
            entry["name"] += call["function"].get("name", "")
            entry["arguments"] += call["function"].get("arguments", "")
    return out


@pytest.mark.parametrize("parser,text,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_documented_formats(parser, text, content, calls):
    fields, finish = outputs_for(parser).message(text, "stop")
    assert fields["content"] == content
    assert calls_of(fields) == calls
    assert finish == ("tool_calls" if calls else "stop")
    for call in fields.get("tool_calls", []):
        assert call["id"].startswith("call_") and call["type"] == "function"


def splits(text: str):
    """Every cut of the text into two deltas, and the text one character at a time (every token boundary of any
    tokenizer is among these cuts)."""
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    yield list(text)


@pytest.mark.parametrize("parser,text,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_deltas_add_up_to_the_whole(parser, text, content, calls):
    whole, _ = outputs_for(parser).message(text, "stop")
    for pieces in splits(text):
        outputs = outputs_for(parser)
        deltas = [d for i, piece in enumerate(pieces) for d in outputs.deltas(0, piece, i == len(pieces) - 1)]
        got = assemble(deltas)
        assert got["content"] == (whole["content"] or ""), pieces
        assert [(c["name"], c["arguments"]) for _, c in sorted(got["calls"].items())] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in whole.get("tool_calls", [])]
        assert outputs.finish_reason(0, "stop") == ("tool_calls" if calls else "stop")


REASONING = [
    ("deepseek_r1", "<think>Paris is in France.</think>The capital is Paris.", "Paris is in France.",
     "The capital is Paris."),
    ("deepseek_r1", "Paris is in France.</think>The capital is Paris.", "Paris is in France.", "The capital is Paris."),
    ("deepseek_r1", "Still thinking about it", "Still thinking about it", None),
    ("qwen3", "<think>\nShort.\n</think>\n\nParis.", "\nShort.\n", "\n\nParis."),
    ("qwen3", "Paris, without thinking.", None, "Paris, without thinking."),
]


@pytest.mark.parametrize("parser,text,reasoning,content", REASONING)
def test_reasoning_split_streamed_and_not(parser, text, reasoning, content):
    fields, _ = outputs_for(None, parser).message(text, "stop")
    assert fields["reasoning"] == fields["reasoning_content"] == reasoning
    assert fields["content"] == content
    if parser == "qwen3" and "<think>" not in text and "</think>" in text:
        return
    for pieces in splits(text):
        outputs = outputs_for(None, parser)
        got = assemble([d for i, p in enumerate(pieces) for d in outputs.deltas(0, p, i == len(pieces) - 1)])
        assert got["reasoning"] == (reasoning or "") and got["content"] == (content or ""), pieces


def test_tool_calls_are_read_from_the_content_after_reasoning():
    text = '<think>I should call the tool.</think>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    fields, finish = outputs_for("hermes", "qwen3").message(text, "stop")
    assert fields["reasoning"] == "I should call the tool."
    assert calls_of(fields) == [("get_time", {})] and fields["content"] is None and finish == "tool_calls"


def test_a_call_cut_by_max_tokens_is_content_and_not_tool_calls():
    fields, finish = outputs_for("hermes").message('<tool_call>\n{"name": "get_ti', "length")
    assert fields["content"] == '<tool_call>\n{"name": "get_ti' and "tool_calls" not in fields and finish == "length"


def test_a_plugin_file_registers_its_parser(tmp_path):
    from hfbridge.server.tool_choice import ToolSettings

    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from hfbridge.server.tool_parsers import ParsedTools, ToolCall, ToolParser\n"
        "class Shout(ToolParser):\n"
        "    name = 'shout'\n"
        "    def parse(self, text, final):\n"
        "        return ParsedTools('', [ToolCall(text.strip('!'), '{}')]) if final and text.endswith('!') "
        "else ParsedTools(text if final else '')\n")
    settings = ToolSettings.build(enable_auto_tool_choice=True, tool_call_parser="shout", plugin=str(plugin))
    fields, finish = ChatOutputs(None, settings.tool_parsers["shout"]()).message("get_time!", "stop")
    assert calls_of(fields) == [("get_time", {})] and finish == "tool_calls"
    with pytest.raises(ValueError, match="unknown"):
        ToolSettings.build(tool_call_parser="shout")  # not registered without the plugin


def test_the_server_and_the_engine_know_the_same_reasoning_formats():
    from hfbridge.structured_output.reasoning import REASONING_TAGS

    assert set(REASONING_PARSERS) == set(REASONING_TAGS)
