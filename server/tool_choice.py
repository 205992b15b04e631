"""Tools in a chat request: the server's parser settings, the request's `tools` and `tool_choice` checked (400s
naming the problem, vLLM's rules), and what follows from them: the tools the template sees, the constraint for
"required" and named choices, and the ChatOutputs that read the reply.
"""
from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfbridge.sample.structured_outputs_params import StructuredOutputsParams
from hfbridge.server.chat_outputs import ChatOutputs, NamedCallParser, RequiredCallsParser
from hfbridge.server.errors import APIError
from hfbridge.server.reasoning_parsers import REASONING_PARSERS, ReasoningParser
from hfbridge.server.tool_parsers import TOOL_PARSERS, ToolParser

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolSettings:
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False
    tool_parsers: dict[str, type[ToolParser]] = field(default_factory=lambda: dict(TOOL_PARSERS))

    @classmethod
    def build(cls, enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
              plugin: str | None = None, reasoning_parser: str | None = None,
              exclude_tools_when_tool_choice_none: bool = False) -> ToolSettings:
        """Checked at start-up: an unknown parser name is an error naming the known ones."""
        parsers = dict(TOOL_PARSERS)
        if plugin is not None:
            parsers.update(load_plugin(plugin))
        if tool_call_parser is not None and tool_call_parser not in parsers:
            raise ValueError(f"--tool-call-parser {tool_call_parser!r} is unknown; known: {sorted(parsers)} "
                             "(--tool-parser-plugin FILE adds more)")
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")
        if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"--reasoning-parser {reasoning_parser!r} is unknown; known: {sorted(REASONING_PARSERS)}")
        return cls(enable_auto_tool_choice, tool_call_parser, reasoning_parser, exclude_tools_when_tool_choice_none,
                   parsers)

    def reasoning(self) -> ReasoningParser | None:
        return REASONING_PARSERS[self.reasoning_parser]() if self.reasoning_parser else None

    @property
    def skip_special_tokens(self) -> bool:
        """False when the tool parser reads special-token markers (Mistral's [TOOL_CALLS])."""
        parser = self.tool_parsers.get(self.tool_call_parser) if self.tool_call_parser else None
        return parser is None or parser.skip_special_tokens


def load_plugin(path: str) -> dict[str, type[ToolParser]]:
    """The ToolParser subclasses a plugin file defines, by their `name`."""
    spec = importlib.util.spec_from_file_location(f"hfbridge_tool_plugin_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--tool-parser-plugin {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = {cls.name: cls for _, cls in inspect.getmembers(module, inspect.isclass)
             if issubclass(cls, ToolParser) and cls is not ToolParser and isinstance(getattr(cls, "name", None), str)
             and cls.__module__ == module.__name__}
    if not found:
        raise ValueError(f"--tool-parser-plugin {path!r} defines no ToolParser subclass with a `name`")
    return found


@dataclass(frozen=True)
class ToolPlan:
    template_tools: list[dict[str, Any]] | None  # what the chat template is given
    constraint: StructuredOutputsParams | None  # "required" / a named function
    outputs: ChatOutputs
    skip_special_tokens: bool = True


def plan_tools(settings: ToolSettings, tools: list[dict[str, Any]] | None, tool_choice: Any,
               has_constraint: bool) -> ToolPlan:
    """The request's tools and tool_choice -> a ToolPlan; APIError(400) for anything malformed."""
    functions = _check_tools(tools) if tools is not None else {}
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    reasoning = settings.reasoning()
    if tool_choice == "none":
        template_tools = None if settings.exclude_tools_when_tool_choice_none else tools
        return ToolPlan(template_tools, None, ChatOutputs(reasoning))
    if not tools:
        raise APIError(400, "When using `tool_choice`, `tools` must be set.", "tool_choice")
    if has_constraint and tool_choice != "auto":
        raise APIError(400, f"tool_choice {tool_choice!r} constrains the reply itself; it cannot be combined with "
                            "response_format or structured_outputs", "tool_choice")
    if tool_choice == "auto":
        if not (settings.enable_auto_tool_choice and settings.tool_call_parser):
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                                "set", "tool_choice")
        parser = settings.tool_parsers[settings.tool_call_parser]()
        return ToolPlan(tools, None, ChatOutputs(reasoning, parser), settings.skip_special_tokens)
    if tool_choice == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                   "parameters": parameters},
                  "required": ["name", "parameters"]} for name, parameters in functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        return ToolPlan(tools, StructuredOutputsParams(json=schema), ChatOutputs(reasoning, RequiredCallsParser()))
    name = _named(tool_choice)
    if name not in functions:
        raise APIError(400, "The tool specified in `tool_choice` does not match any of the specified `tools`",
                       "tool_choice")
    return ToolPlan(tools, StructuredOutputsParams(json=functions[name]),
                    ChatOutputs(reasoning, NamedCallParser(name), calls_finish=False))


def _check_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each function tool, in order."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise APIError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got "
                                f"{str(name)[:80]!r}", "tools")
        if name in functions:
            raise APIError(400, f"{where}: two tools are named {name!r}; tool names must be unique", "tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(400, f"{where}.function.parameters must be a JSON schema object", "tools")
        functions[name] = parameters or _EMPTY_PARAMETERS
    return functions


def _named(tool_choice: Any) -> str:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                        f"{{\"name\": ...}}}}, got {str(tool_choice)[:100]}", "tool_choice")
