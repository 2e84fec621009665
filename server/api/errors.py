"""The OpenAI error object, the exceptions routes raise, and the mapping of every failure to it.

Every error answer is `{"error": {"message", "type", "param", "code"}}`, small whatever the
input: messages are cut to MAX_MESSAGE_CHARS, echoed values to MAX_ECHO_CHARS, at most
MAX_REPORTED_ERRORS validation problems are listed, and anything that looks like a file path,
a memory address or a traceback line is scrubbed (vLLM's sanitize_message, same idea).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from server.engine.errors import InvalidRequestError

MAX_MESSAGE_CHARS = 512
MAX_ECHO_CHARS = 64
MAX_REPORTED_ERRORS = 3

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-~+@]+){2,}[\\/]?")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_TRACEBACK = re.compile(r'(Traceback \(most recent call last\):|File "[^"]*", line \d+)')


class APIError(Exception):
    """An HTTP error answer with OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine_error(exc: InvalidRequestError) -> APIError:
    """The 400 for a request the engine refused, with its param and code (context_length_exceeded
    for a ContextLengthExceededError)."""
    return bad_request(exc.message, param=exc.param, code=exc.code)


def sanitize(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Scrub paths, addresses and traceback lines; cut to `limit` characters."""
    message = _TRACEBACK.sub("", message)
    message = _ADDRESS.sub("0x…", message)
    message = _PATH.sub("<path>", message)
    message = " ".join(message.split())
    if len(message) > limit:
        message = message[: limit - 1] + "…"
    return message


def echo(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """A short repr of a client value for a message."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_body(status_or_err: APIError) -> bytes:
    e = status_or_err
    return json.dumps({"error": {"message": sanitize(e.message), "type": e.type,
                                 "param": None if e.param is None else sanitize(e.param, 128),
                                 "code": e.code}}, ensure_ascii=False).encode()


def error_headers(err: APIError) -> dict[str, str]:
    """The headers of an error answer: its own, and WWW-Authenticate on a 401."""
    headers = dict(err.headers)
    if err.status == 401:
        headers.setdefault("www-authenticate", "Bearer")
    return headers


async def send_error(send, err: APIError) -> None:
    """Answer with `err` through a raw ASGI `send` (middleware that runs before any route)."""
    body = error_body(err)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error_headers(err).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_event(message: str, type: str = "server_error", code: str | None = "internal_error",
                param: str | None = None) -> bytes:
    """An SSE event carrying an error object (for failures after the stream started)."""
    body = json.dumps({"error": {"message": sanitize(message), "type": type, "param": param, "code": code}})
    return b"data: " + body.encode() + b"\n\n"


# ---------------------------------------------------------------------------- pydantic errors
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before",
              "function-plain", "tagged-union", "literal"}


def _is_tag(item: Any) -> bool:
    """Union-member and validator names pydantic puts in a location (never field names)."""
    return isinstance(item, str) and ("[" in item or "(" in item or "-" in item or item in _TYPE_TAGS
                                      or item.startswith("literal"))


def _loc_param(loc: tuple) -> str | None:
    parts: list[str] = []
    for item in loc:
        if _is_tag(item):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "finite_number": "must be a finite number (NaN and Infinity are not allowed)",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be a boolean",
    "string_type": "must be a string",
    "list_type": "must be an array",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
}


def _clean(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    msg = re.sub(r"^(Input|List|String|Dictionary|Value) should ", "must ", msg)
    return re.sub(r" after validation, not (\d+)", r" (got \1)", msg)


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first offending field, listing at most a few problems, short."""
    errors = exc.errors(include_url=False, include_context=False, include_input=True)
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first["type"] in ("model_type", "model_attributes_type") and not first["loc"]:
        return bad_request("request body must be a JSON object", code="invalid_request")
    seen: list[str] = []
    params: list[str | None] = []
    by_param: dict[str | None, dict] = {}
    for err in errors:  # per field, prefer the union member whose type matched (a range error, say)
        param = _loc_param(tuple(err["loc"]))
        best = by_param.get(param)
        if best is None or (best["type"].endswith("_type") and not err["type"].endswith("_type")):
            by_param[param] = err
    for param, err in by_param.items():
        text = _MESSAGES.get(err["type"]) or _clean(str(err.get("msg", "is invalid")))
        value = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and (value is None or isinstance(value, (bool, int, float, str))):
            text += f" (got {echo(value)})"
        seen.append(f"{param or 'body'}: {text}")
        params.append(param)
    extra = len(seen) - MAX_REPORTED_ERRORS
    message = "; ".join(seen[:MAX_REPORTED_ERRORS]) + (f" (and {extra} more)" if extra > 0 else "")
    return bad_request(message, param=params[0], code="invalid_value" if first["type"] != "missing" else "missing_field")
