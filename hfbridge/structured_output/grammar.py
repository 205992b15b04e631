"""A constraint -> an xgrammar Grammar (tokenizer-free, milliseconds); errors as ValidationError naming the field.

xgrammar is imported on first use: it costs about a second, and a server that never sees a constraint never pays it.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

from hfbridge.errors import ValidationError
from hfbridge.sample.structured_outputs_params import StructuredOutputsParams

# Free whitespace in JSON is bounded per run: a small model can otherwise spend every token on the spaces and
# newlines that JSON allows between tokens. 16 still admits indented JSON a few levels deep.
MAX_JSON_WHITESPACE = 16
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] [^ ]+:\d+: ")  # xgrammar's "[12:00:00] /path/file.cc:42: " before messages


def parse_grammar(params: StructuredOutputsParams) -> Any:
    """The xgrammar Grammar of `params`' constraint; ValidationError when xgrammar refuses it."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind == "json" or kind == "json_object":
            schema = params.json if kind == "json" else {"type": "object"}
            if params.disable_additional_properties:
                schema = _closed_objects(schema)
            return xgr.Grammar.from_json_schema(
                json.dumps(schema), any_whitespace=not params.disable_any_whitespace,
                max_whitespace_cnt=None if params.disable_any_whitespace else MAX_JSON_WHITESPACE,
                # json_object: any object, so properties the (empty) schema does not name are allowed
                strict_mode=kind == "json",
            )
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(params.grammar)
    except RecursionError as e:
        raise ValidationError(f"The {kind} constraint is nested too deeply", parameter="structured_outputs") from e
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValidationError(_message(kind, params, e), parameter="structured_outputs") from e


def _message(kind: str, params: StructuredOutputsParams, error: Exception) -> str:
    detail = _CPP_PREFIX.sub("", str(error).strip())[:500]
    what = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex",
            "choice": "choice list", "grammar": "grammar"}[kind]
    hint = ""
    if kind == "grammar" and "::=" not in params.grammar:
        hint = " (it looks like Lark; hfbridge takes EBNF/GBNF grammars: `root ::= ...`)"
    return f"Invalid or unsupported {what}{hint}: {detail}"


def _closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that does not set it (vLLM's
    disable_additional_properties)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema
