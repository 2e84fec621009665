"""Pydantic models of the OpenAI wire format (requests validated strictly, responses documented).

Requests are parsed by pydantic (serving.parse_body: its JSON parser, then the model) in strict
mode: a JSON string is never a number, `true` is never an integer, NaN / Infinity literals and
out-of-range floats are refused, lone surrogate escapes and invalid UTF-8 are invalid JSON.
Unknown fields are ignored (as OpenAI and vLLM do), nulls mean "the default" (completions'
max_tokens: 16; chat's: the rest of the context window). A completions prompt is validated
against the one shape its type names (for an array, the one type all its elements share:
Prompt), so a prompt of a million token ids costs one pass, not one failed pass per other shape;
every array stops at its first bad element (Array), so an invalid array of a million elements
costs one error, not a million. Range checks that depend on the server's configuration (n,
prompts per request) or on the model (context window, vocabulary) happen in serving.py; the
sampler's own checks (SamplingParams) run there too. The output constraints (response_format,
vLLM's guided_* fields and structured_outputs) are checked for shape here and turned into the
engine's GrammarSpec by server/api/structured.py; logit_bias is validated here into the engine's
sorted (token id, bias) pairs.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.api.errors import echo
from server.engine.request import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS
from server.engine.telemetry import RequestHeadTelemetry

MAX_NAME_CHARS = 256
MAX_MESSAGES = 2048  # as OpenAI: a longer conversation is refused before its messages are validated
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (also when null)


def ascii_uint(text: str, max_digits: int = 18) -> int | None:
    """The integer a query or header value spells in ASCII digits, else None. (str.isdigit also
    accepts "²" and other Unicode digits, which int() then refuses.)"""
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)


def _custom(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _check_finite_json(value: Any, depth: int = 0) -> Any:
    """Reject non-finite floats anywhere in a free-form JSON value (chat_template_kwargs)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise _custom("must not contain NaN or Infinity")
    if isinstance(value, dict):
        for v in value.values():
            _check_finite_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_finite_json(v, depth + 1)
    return value


def Array(item: Any, **constraints: Any) -> Any:
    """A JSON array of `item`s whose validation stops at the first bad element."""
    return Annotated[list[item], Field(fail_fast=True, **constraints)]


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Array(TokenId)


# ------------------------------------------------------------------------------- requests
class StreamOptions(_Strict):
    include_usage: bool | None = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# free-form keyword arguments for the chat template, with no NaN or Infinity anywhere inside
ChatTemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(_check_finite_json)]


# ---------------------------------------------------------------------- output constraints
def _format_name(name: str) -> str:
    """response_format.json_schema.name as OpenAI allows it."""
    if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
        raise _custom("must be 1 to 64 characters, each a letter, a digit, '_' or '-'")
    return name


# a JSON schema given as an object, with no NaN or Infinity anywhere inside
SchemaObject = Annotated[dict[str, Any], AfterValidator(_check_finite_json)]


def _schema_shape(value: Any) -> str | None:
    """The tag of the SchemaOrText member `value` can be."""
    return "schema-object" if isinstance(value, dict) else "schema-text" if isinstance(value, str) else None


# vLLM's guided_json and structured_outputs.json: a JSON schema as an object or as its JSON text
SchemaOrText = Annotated[
    Annotated[SchemaObject, Tag("schema-object")] | Annotated[str, Tag("schema-text")],
    Discriminator(_schema_shape, custom_error_type="invalid_value",
                  custom_error_message="must be a JSON schema: an object, or its JSON text")]
Choices = Array(str, min_length=1)


class JsonSchemaFormat(_Strict):
    """response_format.json_schema (OpenAI): the output is JSON matching `schema`, whatever
    `strict` says; `description` is accepted and not used."""

    name: Annotated[str, AfterValidator(_format_name)]
    schema_: SchemaObject = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _custom('json_schema is required when type is "json_schema"')
        return self


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs object: one constraint among its fields (server/api/structured.py
    refuses two, and structural_tag, which is not supported)."""

    json_: SchemaOrText | None = Field(None, alias="json")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None


def _logit_bias_pairs(bias: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as the engine's sorted (token id, bias) pairs: at most
    MAX_LOGIT_BIAS_ENTRIES entries, ids written in decimal digits (each id once), biases finite
    numbers in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]. The ids are checked against the vocabulary in
    serving.py."""
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise _custom(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}")
    pairs: dict[int, float] = {}
    for key, value in bias.items():
        token = ascii_uint(key, max_digits=10)
        if token is None:
            raise _custom(f"keys must be token ids written in decimal digits, got {echo(key)}")
        if token in pairs:
            raise _custom(f"token id {token} is given more than once")
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or abs(value) > MAX_LOGIT_BIAS):
            raise _custom(f"the bias of token {token} must be a number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                          f"got {echo(value)}")
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))


# the request's JSON object, validated into sorted (token id, bias) pairs
LogitBias = Annotated[dict[str, Any], AfterValidator(_logit_bias_pairs)]


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names + extensions)."""

    model: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: (Annotated[str, Field(max_length=1024)] | Array(Annotated[str, Field(max_length=1024)], max_length=64)
           | None) = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    user: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    # extensions (vLLM names)
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    ignore_eos: bool | None = False
    stop_token_ids: Array(TokenId, max_length=64) | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    return_token_ids: bool | None = False  # each choice also carries its token ids (vLLM's extension)
    # output constraints (vLLM's names; at most one per request, response_format included)
    guided_json: SchemaOrText | None = None
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None  # a Lark grammar
    structured_outputs: StructuredOutputs | None = None
    # headwise: per-request per-head attention statistics (DESIGN.md "Contracts")
    head_telemetry: bool | None = False


_ARRAY_SHAPES = {str: "text-list", int: "token-ids", list: "token-id-lists"}  # element type -> Prompt tag


def _prompt_shape(value: Any) -> str | None:
    """The tag of the one Prompt member `value` can be: from its type, and for an array from the
    one type all its elements share (set(map(type, ...)) runs in C: a bool is not an int here)."""
    if isinstance(value, str):
        return "text-prompt"
    if not isinstance(value, list):
        return None
    if not value:
        return "token-ids"  # refused as an empty prompt by serving.py, like [[]]
    types = set(map(type, value))
    return _ARRAY_SHAPES.get(types.pop()) if len(types) == 1 else None


# tags contain "-" so that error locations skip them (errors._is_tag)
Prompt = Annotated[
    Annotated[str, Tag("text-prompt")] | Annotated[Array(str), Tag("text-list")]
    | Annotated[TokenIds, Tag("token-ids")] | Annotated[Array(TokenIds), Tag("token-id-lists")],
    Discriminator(_prompt_shape, custom_error_type="invalid_value",
                  custom_error_message="must be a string, an array of strings, an array of token ids "
                                       "or an array of token-id arrays")]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _null_max_tokens_is_the_default(cls, v: int | None) -> int:
        return DEFAULT_COMPLETION_MAX_TOKENS if v is None else v


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Array(TextContentPart) | None = None
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _content_parts(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("content"), list):
            for part in v["content"]:
                if not isinstance(part, dict):
                    break  # the content field's own validation reports it
                kind = part.get("type")
                if isinstance(kind, str) and kind != "text":
                    raise _custom(f"content part type {kind[:32]!r} is not supported; only text parts are")
        return v


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Array(ChatMessage, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: ChatTemplateKwargs = None


class TokenizeRequest(_Strict):
    """POST /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    prompt: str | None = None
    messages: Array(ChatMessage, min_length=1, max_length=MAX_MESSAGES) | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True
    chat_template_kwargs: ChatTemplateKwargs = None
    return_token_strs: bool | None = False


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    model: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    tokens: TokenIds


# ------------------------------------------------------------------------------ responses
class _Doc(BaseModel):
    """Response models document the wire format (OpenAPI); extra fields are allowed."""

    model_config = ConfigDict(extra="allow")


class ErrorInfo(_Doc):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Doc):
    error: ErrorInfo


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(_Doc):
    """Seconds (time.monotonic based) and the decode rate of a request (server/api/__init__.py, "Extra response fields")."""

    queue_time: float
    time_to_first_token: float | None = None
    prefill_time: float | None = None
    decode_time: float | None = None
    e2e_latency: float
    decode_tokens_per_s: float | None = None


class _Choice(_Doc):
    """Fields every choice has, in completions and chat alike."""

    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class _Response(_Doc):
    """Fields of every non-streamed generation response."""

    id: str
    created: int
    model: str
    usage: Usage
    timings: Timings | None = None
    head_telemetry: RequestHeadTelemetry | None = None  # the engine's contract type (DESIGN.md)


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ChatCompletionMessage(_Doc):
    role: Literal["assistant"]
    content: str | None = None


class ChatCompletionChoice(_Choice):
    message: ChatCompletionMessage


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"]
    choices: list[ChatCompletionChoice]


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Doc):
    prompt: str


class HealthResponse(_Doc):
    status: str


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
