"""StructuredOutputsParams: vLLM's names for a decoding constraint (one per request) and its options.

Checked here without xgrammar (types, exactly one constraint, JSON that parses, nesting); whether xgrammar
accepts the schema, regex or grammar is checked by hfbridge.structured_output.grammar before the request is
queued."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from typing import Any

from hfbridge.errors import ValidationError

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")
MAX_JSON_DEPTH = 64  # vLLM's limit; deeper schemas are refused before they reach a recursive converter
MAX_CHOICES = 4096


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (dict, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF / GBNF, as xgrammar parses it
    json_object: bool | None = None  # any JSON object
    disable_fallback: bool = False  # one backend only: nothing to fall back to
    disable_any_whitespace: bool = False  # JSON without free whitespace (compact separators)
    disable_additional_properties: bool = False  # objects without `additionalProperties` get it false
    whitespace_pattern: str | None = None  # an outlines option; refused (xgrammar has no such knob)
    structural_tag: str | None = None  # refused: not implemented

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if self.structural_tag is not None:
            raise _invalid("structural_tag constraints are not supported by hfbridge; use json, regex, choice, "
                           "grammar or json_object")
        if len(given) > 1:
            raise _invalid(f"You can only use one kind of structured outputs constraint but multiple are specified: "
                           f"{', '.join(given)}")
        if not given:
            raise _invalid("You must use one kind of structured outputs constraint: json, regex, choice, grammar or "
                           "json_object")
        if self.whitespace_pattern is not None:
            raise _invalid("whitespace_pattern is not supported by the xgrammar backend; use "
                           "disable_any_whitespace=True for compact JSON")
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(f"structured_outputs.{name} must be true or false")
        getattr(self, f"_check_{given[0]}")()

    # -- one check per constraint kind
    def _check_json(self) -> None:
        schema = self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise _invalid(f"structured_outputs.json is not valid JSON: {e}") from e
        if not isinstance(schema, (dict, bool)):
            raise _invalid(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
        if _depth(schema) > MAX_JSON_DEPTH:
            raise _invalid(f"The JSON schema is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        object.__setattr__(self, "json", schema)

    def _check_regex(self) -> None:
        if not isinstance(self.regex, str) or not self.regex:
            raise _invalid("structured_outputs.regex must be a non-empty string")

    def _check_choice(self) -> None:
        choice = self.choice
        if not isinstance(choice, (list, tuple)) or not choice:
            raise _invalid("structured_outputs.choice must be a non-empty list of strings")
        if not all(isinstance(c, str) and c for c in choice):
            raise _invalid("structured_outputs.choice must hold non-empty strings only")
        if len(choice) > MAX_CHOICES:
            raise _invalid(f"structured_outputs.choice may hold at most {MAX_CHOICES} strings, got {len(choice)}")
        object.__setattr__(self, "choice", list(choice))

    def _check_grammar(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise _invalid("structured_outputs.grammar must be a non-empty grammar string")

    def _check_json_object(self) -> None:
        if self.json_object is not True:
            raise _invalid("structured_outputs.json_object must be true when given (leave it unset otherwise)")

    def __deepcopy__(self, memo: dict) -> StructuredOutputsParams:
        return self  # never changed after __post_init__: the n samples of a request share one (a schema can be large)

    @property
    def kind(self) -> str:
        return next(name for name in CONSTRAINTS if getattr(self, name) is not None)

    @functools.cached_property
    def key(self) -> tuple:
        """What the compiled grammar depends on: the constraint (property order kept: it is the output's order) and
        the options that change it. Computed once: the n samples of a request share these params, and each asks."""
        spec = getattr(self, self.kind)
        if self.kind == "json":
            spec = json.dumps(spec)
        elif self.kind == "choice":
            spec = tuple(spec)
        return self.kind, spec, self.disable_any_whitespace, self.disable_additional_properties

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "structured_outputs") -> StructuredOutputsParams:
        """From a request body's object: unknown keys are refused by name (a constraint never goes unread)."""
        if not isinstance(values, dict):
            raise _invalid(f"{where} must be an object", where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise _invalid(f"{where} has unknown field(s) {unknown}; known: {sorted(known)}", where)
        return cls(**{k: v for k, v in values.items() if v is not None})


def _invalid(message: str, parameter: str = "structured_outputs") -> ValidationError:
    return ValidationError(message, parameter=parameter)


def _depth(value: Any, level: int = 0) -> int:
    """Nesting depth of a JSON value, iteratively (a hostile schema must not reach Python's recursion limit)."""
    deepest, stack = level, [(value, level)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest
