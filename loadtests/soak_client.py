"""Sends one Action of the soak mix and says what came back, as an Outcome.

Every send is bounded: by the Action's own disconnect point, or by `timeout` seconds (then the
request counts as hung). A request is finished when every choice it asked for ended with
finish_reason "stop" or "length" and, for a stream, `data: [DONE]` arrived after them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx

from loadtests import sse
from loadtests.soak_records import Action, Outcome

NORMAL_FINISH = frozenset({"stop", "length"})
CHUNK = 64 * 1024


@dataclass
class _Seen:
    """What has arrived so far for one request (mutable while it runs)."""

    status: int | None = None
    retry_after: bool | None = None
    code: str | None = None
    done: bool = False                           # `data: [DONE]` arrived
    finishes: dict[int, str] = field(default_factory=dict)  # choice index -> finish_reason
    events: int = 0                              # data events that carried choices
    left: bool = False                           # the client closed on purpose
    error: str | None = None


def error_code(body: bytes) -> str | None:
    """The `code` (else `type`) of an OpenAI error object; None if the body is not one."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(err, dict):
        return None
    return str(err.get("code") or err.get("type") or "") or None


def read_choices(obj: dict, seen: _Seen) -> None:
    """Notes the finish_reason of each choice in one response object or stream chunk."""
    for i, choice in enumerate(obj.get("choices") or ()):
        if not isinstance(choice, dict):
            continue
        reason = choice.get("finish_reason")
        if reason:
            seen.finishes[int(choice.get("index", i))] = str(reason)


def finished(seen: _Seen, action: Action) -> bool:
    ok = (len(seen.finishes) == action.choices and set(seen.finishes) == set(range(action.choices))
          and set(seen.finishes.values()) <= NORMAL_FINISH and seen.error is None)
    return ok and (seen.done or not action.stream)


def stream_line(line: str, seen: _Seen) -> None:
    """One line of an SSE body."""
    if not line.startswith("data:"):
        return
    data = line[5:].strip()
    if data == "[DONE]":
        seen.done = True
        return
    try:
        obj = json.loads(data)
    except ValueError:
        seen.error = seen.error or "malformed SSE data"
        return
    if not isinstance(obj, dict):
        seen.error = seen.error or "malformed SSE data"
    elif "error" in obj:
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        seen.error = seen.error or f"stream error: {str(msg)[:160]}"
    else:
        if obj.get("choices"):
            seen.events += 1
        read_choices(obj, seen)


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), CHUNK):
        yield body[i:i + CHUNK]


OnStatus = Callable[[int], Awaitable[None]]


async def _send(client: httpx.AsyncClient, url: str, headers: Mapping[str, str], action: Action, seen: _Seen,
                on_status: OnStatus | None) -> None:
    content = _pieces(action.body) if action.chunked else action.body
    headers = {**headers, "content-type": "application/json"}
    async with client.stream("POST", url, content=content, headers=headers) as r:
        seen.status = r.status_code
        if on_status is not None:
            await on_status(r.status_code)
        if not 200 <= r.status_code < 300:
            if r.status_code == 503:
                seen.retry_after = "retry-after" in r.headers
            seen.code = error_code(await r.aread())
            return
        if not action.stream:
            try:
                obj = json.loads(await r.aread())
            except ValueError:
                seen.error = "malformed JSON response"
                return
            read_choices(obj if isinstance(obj, dict) else {}, seen)
            return
        if action.close_at_headers:
            seen.left = True
            return
        async for line in sse.lines(r.aiter_bytes()):
            stream_line(line, seen)
            if seen.done:
                return
            if action.read_events is not None and seen.events >= action.read_events:
                seen.left = True
                return


async def execute(client: httpx.AsyncClient, base_url: str, headers: Mapping[str, str], action: Action, *,
                  timeout: float, clock: Callable[[], float], on_status: OnStatus | None = None) -> Outcome:
    """Sends `action`; never raises for what the server or the network does. `on_status` is
    awaited as soon as the status line arrives (a burst holds its admitted streams there)."""
    seen, start = _Seen(), clock()
    url = base_url.rstrip("/") + action.path
    limit = action.cancel_after if action.cancel_after is not None else timeout
    try:
        await asyncio.wait_for(_send(client, url, headers, action, seen, on_status), limit)
    except asyncio.TimeoutError:
        if action.cancel_after is not None:  # the client gives up on purpose, answered or not
            seen.left = True
        else:
            seen.error = f"hung: no end after {limit:g} s"
    except httpx.HTTPError as e:
        seen.error = f"{type(e).__name__}: {e}"[:200]
    return outcome(action, seen, start, clock())


def outcome(action: Action, seen: _Seen, start: float, end: float) -> Outcome:
    admitted = seen.status is not None and 200 <= seen.status < 300
    reasons = set(seen.finishes.values()) - NORMAL_FINISH
    error = seen.error
    if error is None and admitted and not seen.left and reasons:
        error = f"finish_reason {', '.join(sorted(reasons))}"
    if error is None and admitted and not seen.left and not finished(seen, action):
        error = "stream ended without [DONE]" if action.stream and not seen.done else "a choice had no finish_reason"
    return Outcome(kind=action.kind, variant=action.variant, start=start, end=end, status=seen.status,
                   expected=None if seen.status is None else seen.status in action.expect, admitted=admitted,
                   finished=None if seen.left or not admitted else error is None, left_on_purpose=seen.left,
                   retry_after=seen.retry_after, code=seen.code, error=error)
