"""Sending streaming requests (httpx, asyncio) and timing every token-carrying SSE chunk."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from loadtests import sse
from loadtests.records import Chunk, LoadPoint, Prompt, RequestRecord, RunRecord
from loadtests.schedule import arrival_offsets
from loadtests.target import Target, request_body


@dataclass
class _InFlight:
    """What one request has received so far (kept so that a cut-off request still reports)."""

    send_time: float
    chunks: list[Chunk] = field(default_factory=list)
    counted_tokens: int = 0
    usage: dict | None = None
    finish_reason: str | None = None

    def record(self, ok: bool, error: str | None = None, end: float | None = None) -> RequestRecord:
        usage = self.usage or {}
        out = usage.get("completion_tokens")
        return RequestRecord(
            ok=ok, send_time=self.send_time, end_time=end if end is not None else time.perf_counter(),
            chunks=tuple(self.chunks), output_tokens=out if isinstance(out, int) else self.counted_tokens,
            prompt_tokens=usage.get("prompt_tokens"), finish_reason=self.finish_reason, error=error)


def chunk_tokens(obj: dict, chat: bool) -> tuple[int, str | None]:
    """(tokens carried, finish reason) of one parsed SSE chunk: token_ids when present, else one
    token per choice with non-empty text."""
    tokens, finish = 0, None
    for choice in obj.get("choices") or ():
        ids = choice.get("token_ids")
        if ids:
            tokens += len(ids)
        elif chat:
            delta = choice.get("delta") or {}
            tokens += 1 if delta.get("content") or delta.get("reasoning_content") else 0
        else:
            tokens += 1 if choice.get("text") else 0
        finish = choice.get("finish_reason") or finish
    return tokens, finish


async def _stream(client: httpx.AsyncClient, target: Target, prompt: Prompt, state: _InFlight) -> RequestRecord:
    chat = target.endpoint == "chat"
    async with client.stream("POST", target.url, json=request_body(target, prompt), headers=target.headers) as r:
        if r.status_code != 200:
            body = (await r.aread()).decode(errors="replace")
            return state.record(False, f"HTTP {r.status_code}: {_error_message(body)}")
        async for line in sse.lines(r.aiter_bytes()):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                return state.record(False, "malformed SSE data")
            if "error" in obj:
                return state.record(False, f"stream error: {_error_message(json.dumps(obj))}")
            if obj.get("usage"):
                state.usage = obj["usage"]
            n, finish = chunk_tokens(obj, chat)
            if n:
                state.chunks.append(Chunk(now, n))
                state.counted_tokens += n
            state.finish_reason = finish or state.finish_reason
    if not state.chunks:
        return state.record(False, "no tokens received")
    return state.record(True)


def _error_message(body: str) -> str:
    try:
        err = json.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg)[:200]
    except (ValueError, AttributeError):
        return body[:200]


async def send(client: httpx.AsyncClient, target: Target, prompt: Prompt, state: _InFlight) -> RequestRecord:
    """One streaming request, bounded by target.request_timeout; failures become records."""
    try:
        return await asyncio.wait_for(_stream(client, target, prompt, state), target.request_timeout)
    except asyncio.TimeoutError:
        return state.record(False, f"timed out after {target.request_timeout:g} s")
    except httpx.HTTPError as e:
        return state.record(False, f"{type(e).__name__}: {e}"[:200])


async def run_point(target: Target, prompts: Sequence[Prompt], point: LoadPoint, *, max_duration: float,
                    seed: int = 0, on_done: Callable[[RequestRecord], None] | None = None,
                    client: httpx.AsyncClient | None = None) -> RunRecord:
    """Send every prompt at `point`'s rate under its concurrency cap; stop sending and cut off
    what is in flight after max_duration seconds."""
    offsets = arrival_offsets(len(prompts), point.request_rate, seed)
    limit = asyncio.Semaphore(point.concurrency) if point.concurrency else None
    width = point.concurrency or max(len(prompts), 1)
    own = client is None
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(target.request_timeout, connect=10.0),
                                         limits=httpx.Limits(max_connections=width, max_keepalive_connections=width))
    in_flight: dict[int, _InFlight] = {}
    start = time.perf_counter()
    deadline = start + max_duration

    async def one(i: int) -> RequestRecord | None:
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is not None:
            await limit.acquire()
        try:
            if time.perf_counter() >= deadline:
                return None
            state = in_flight[i] = _InFlight(send_time=time.perf_counter())
            record = await send(client, target, prompts[i], state)
        finally:
            if limit is not None:
                limit.release()
        if on_done is not None:
            on_done(record)
        return record

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    try:
        done, pending = await asyncio.wait(tasks, timeout=max_duration) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        records = []
        for i, task in enumerate(tasks):
            if task in done and task.result() is not None:
                records.append(task.result())
            elif i in in_flight:  # cut off at the time limit
                records.append(in_flight[i].record(False, f"stopped at the time limit ({max_duration:g} s)"))
    finally:
        if own:
            await client.aclose()
    end = max([start] + [r.end_time for r in records])
    return RunRecord(point=point, requests=tuple(records), start_time=start, end_time=end,
                     stopped_early=bool(pending))
