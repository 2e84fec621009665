"""The request fields that constrain a generation's output -> the engine's GrammarSpec.

A request may set at most one constraint, among OpenAI's response_format (json_object,
json_schema) and vLLM's guided_json, guided_regex, guided_choice, guided_grammar and the fields
of structured_outputs (json, regex, choice, grammar, json_object); two are refused with a 400
that names both. The GrammarSpec's param is the field the constraint came from, so that the
engine's refusal of a bad schema, regex or grammar (server/engine/structured.py) names it.
Shapes were checked by the request models (schemas.py); what the text says is the engine's to
judge, when it compiles it.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.errors import bad_request
from server.api.schemas import ResponseFormat, StructuredOutputs, _SamplingFields
from server.engine.request import GrammarSpec


def grammar_spec(req: _SamplingFields) -> GrammarSpec | None:
    """The one output constraint req asks for, or None; a 400 when it asks for more than one."""
    found = _response_format(req.response_format) + _guided(req) + _structured_outputs(req.structured_outputs)
    if len(found) > 1:
        names = ", ".join(param for param, _, _ in found)
        raise bad_request(f"at most one output constraint per request, got {len(found)}: {names}",
                          param=found[1][0])
    if not found:
        return None
    param, kind, value = found[0]
    return GrammarSpec(kind, value, param=param)


def _schema_text(schema: dict[str, Any] | str) -> str:
    """A JSON schema's text: an object is dumped, text is passed on as the client wrote it."""
    return schema if isinstance(schema, str) else json.dumps(schema)


def _response_format(fmt: ResponseFormat | None) -> list[tuple[str, str, str]]:
    """(param, kind, value) of response_format's constraint; none for text."""
    if fmt is None or fmt.type == "text":
        return []
    if fmt.type == "json_object":
        return [("response_format", "json_object", "")]
    return [("response_format", "json_schema", json.dumps(fmt.json_schema.schema_))]


def _guided(req: _SamplingFields) -> list[tuple[str, str, str]]:
    """(param, kind, value) of each guided_* field set."""
    fields = [("guided_json", "json_schema", None if req.guided_json is None else _schema_text(req.guided_json)),
              ("guided_regex", "regex", req.guided_regex),
              ("guided_choice", "choice", None if req.guided_choice is None else json.dumps(req.guided_choice)),
              ("guided_grammar", "grammar", req.guided_grammar)]
    return [(param, kind, value) for param, kind, value in fields if value is not None]


def _structured_outputs(so: StructuredOutputs | None) -> list[tuple[str, str, str]]:
    """(param, kind, value) of each field of structured_outputs set; structural_tag is refused."""
    if so is None:
        return []
    if so.structural_tag is not None:
        raise bad_request("structured_outputs.structural_tag is not supported", param="structured_outputs.structural_tag",
                          code="unsupported_parameter")
    fields = [("json", "json_schema", None if so.json_ is None else _schema_text(so.json_)),
              ("regex", "regex", so.regex),
              ("choice", "choice", None if so.choice is None else json.dumps(so.choice)),
              ("grammar", "grammar", so.grammar),
              ("json_object", "json_object", "" if so.json_object else None)]
    return [(f"structured_outputs.{name}", kind, value) for name, kind, value in fields if value is not None]
