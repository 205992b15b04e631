"""Request fields that constrain decoding -> one StructuredOutputsParams (or None).

Three spellings reach the same constraint: OpenAI's `response_format`, vLLM's `structured_outputs` extra field, and
the legacy `guided_*` fields (vLLM now ignores those silently; here they are aliases, never ignored). A request
that gives constraints in two of them is refused, as is anything malformed: a 400 naming the field.
"""
from __future__ import annotations

import re
from typing import Any

from hfbridge.errors import ValidationError
from hfbridge.sample.structured_outputs_params import StructuredOutputsParams
from hfbridge.server.errors import APIError

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
GUIDED_OPTIONS = {"guided_whitespace_pattern": "whitespace_pattern"}
BACKENDS = ("auto", "xgrammar")
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


def structured_outputs_of(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The request's constraint, from whichever of the three spellings it used; None when it has none."""
    sources = {}
    if body.get("response_format") is not None:
        constraint = _response_format(body["response_format"])
        if constraint is not None:
            sources["response_format"] = constraint
    if body.get("structured_outputs") is not None:
        sources["structured_outputs"] = _checked("structured_outputs", body["structured_outputs"])
    guided = {key: body[name] for name, key in {**GUIDED_FIELDS, **GUIDED_OPTIONS}.items()
              if body.get(name) is not None}
    if guided:
        given = [name for name in GUIDED_FIELDS if body.get(name) is not None]
        sources[given[0] if len(given) == 1 else "guided_*"] = _checked(given[0] if given else "guided_*", guided)
    _check_backend(body.get("guided_decoding_backend"))
    if len(sources) > 1:
        raise APIError(400, f"The request gives structured outputs constraints in {' and '.join(sources)}; "
                            "give exactly one", next(iter(sources)))
    return next(iter(sources.values()), None)


def _response_format(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        raise APIError(400, "`response_format` must be an object such as {\"type\": \"json_object\"}",
                       "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _checked("response_format", {"json_object": True})
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "When response_format type is 'json_schema', the 'json_schema' field must be "
                                "provided (an object with `name` and `schema`).", "response_format")
        unknown = sorted(set(spec) - _JSON_SCHEMA_KEYS)
        if unknown:
            raise APIError(400, f"response_format.json_schema has unknown field(s) {unknown}; it takes "
                                f"{sorted(_JSON_SCHEMA_KEYS)}", "response_format")
        name = spec.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise APIError(400, "response_format.json_schema.name must be 1-64 letters, digits, underscores or "
                                f"dashes, got {str(name)[:80]!r}", "response_format")
        for key, kinds in (("description", str), ("strict", bool)):
            if spec.get(key) is not None and not isinstance(spec[key], kinds):
                raise APIError(400, f"response_format.json_schema.{key} must be a {kinds.__name__}", "response_format")
        if not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", "response_format")
        return _checked("response_format", {"json": spec["schema"]})
    raise APIError(400, f"response_format type {str(kind)[:40]!r} is not supported; use 'text', 'json_object' or "
                        "'json_schema'", "response_format")


def _checked(field: str, values: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams.from_dict(values, field)
    except ValidationError as e:
        raise APIError(400, str(e.args[0]), field) from e
    except (TypeError, ValueError) as e:
        raise APIError(400, f"`{field}` is malformed: {e}", field) from e


def _check_backend(backend: Any) -> None:
    if backend is not None and backend not in BACKENDS:
        raise APIError(400, f"guided_decoding_backend {str(backend)[:40]!r} is not available: hfbridge constrains "
                            f"decoding with xgrammar ({' or '.join(BACKENDS)})", "guided_decoding_backend")
