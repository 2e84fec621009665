"""Token events -> OpenAI response objects and SSE chunks, usage, timings, [DONE].

The engine already detokenizes incrementally (text never splits a UTF-8 character) and trims
stop strings, so this module only formats. One SSE event per choice per wake-up: when several
events of a request are already queued (the client or the event loop fell behind) they are
coalesced into one chunk per choice rather than sent one by one. A stream whose client stopped
reading ends with a slow_consumer error event (SlowConsumer). A non-streaming response is built
and encoded a choice at a time, each in pieces (encode) that take one short json.dumps call.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from server.api.errors import error_event
from server.engine.output import EventFold, TokenEvent
from server.engine.request import FinishReason, RequestStats, TokenLogprob
from server.engine.telemetry import STAT_NAMES, RequestHeadTelemetry, combine_request_telemetry

log = logging.getLogger("headwise.api")

DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # stands for -inf (JSON has no infinities), as vLLM does
ENCODE_SPLIT_DEPTH = 3  # encode() takes apart this many levels: a choice, its logprobs, their token list


class SlowConsumer(Exception):
    """The stream's client stopped reading and its buffer bound was passed: its generation was
    stopped (serving.Generation)."""


def sse(obj: dict) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def encode(obj: Any) -> bytes:
    """The bytes of dumps(obj) (for dicts with string keys, as all of ours are), made in pieces:
    the dicts and lists of the top ENCODE_SPLIT_DEPTH levels are taken apart and what is below is
    encoded by one json.dumps call each (one token's logprobs, say). json.dumps holds the GIL for
    its whole call, so a thread that encoded megabytes at once would stall the event loop."""
    parts: list[bytes] = []
    _encode_into(obj, ENCODE_SPLIT_DEPTH, parts)
    return b"".join(parts)


def _encode_into(obj: Any, depth: int, parts: list[bytes]) -> None:
    if depth == 0 or not isinstance(obj, (dict, list)) or not obj:
        parts.append(dumps(obj))
        return
    if isinstance(obj, dict):
        parts.append(b"{")
        for i, (key, value) in enumerate(obj.items()):
            parts.append((b"," if i else b"") + dumps(key) + b":")
            _encode_into(value, depth - 1, parts)
        parts.append(b"}")
        return
    parts.append(b"[")
    for i, item in enumerate(obj):
        if i:
            parts.append(b",")
        _encode_into(item, depth - 1, parts)
    parts.append(b"]")


def _lp(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE token text -> raw bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenStrings:
    """Token id -> (text, raw bytes) for logprobs, cached.

    A token that is not valid UTF-8 on its own (part of a multi-byte character) is shown as
    OpenAI does, "bytes:\\xe6\\x97", and its raw bytes are exact for byte-level BPE
    tokenizers (others fall back to the token's decoded text)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes_of = _byte_decoder() if self._byte_level else {}

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        if self._byte_level and token_id not in self._special:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(ch in self._bytes_of for ch in piece):
                raw = bytes(self._bytes_of[ch] for ch in piece)
                try:
                    return raw.decode("utf-8"), raw
                except UnicodeDecodeError:
                    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text, text.encode("utf-8")

    def entry(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._compute(token_id)
            if len(self._cache) < 1_000_000:
                self._cache[token_id] = hit
        return hit

    def __call__(self, token_id: int) -> str:
        return self.entry(token_id)[0]


# ------------------------------------------------------------------------------ per choice
@dataclass(kw_only=True)
class ChoiceState(EventFold):
    """One choice of a response: the events it has produced so far, folded (EventFold), and the
    text offset at which its next completion logprob starts."""

    index: int
    text_offset: int = 0


def coalesce(batch: Sequence[tuple[int, TokenEvent]]) -> dict[int, EventFold]:
    """One wake-up's news per choice: each choice's queued events folded in order."""
    deltas: dict[int, EventFold] = {}
    for index, ev in batch:
        deltas.setdefault(index, EventFold()).add(ev)
    return deltas


# ------------------------------------------------------------------------------ aggregates
def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def timings(stats: Sequence[RequestStats]) -> dict | None:
    """Seconds. One choice: its own timings. Several: the earliest queue exit and first token,
    the last finish, and the aggregate decode rate (tokens after each first token / longest decode)."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    if len(stats) == 1:
        s = stats[0]
        return {"queue_time": s.queue_time, "time_to_first_token": s.time_to_first_token,
                "prefill_time": s.prefill_time, "decode_time": s.decode_time, "e2e_latency": s.e2e_latency,
                "decode_tokens_per_s": _finite_or_none(s.decode_tokens_per_s)}
    ttfts = [s.time_to_first_token for s in stats if s.time_to_first_token is not None]
    prefills = [s.prefill_time for s in stats if s.prefill_time is not None]
    decodes = [s.decode_time for s in stats if s.decode_time is not None]
    decode_time = max(decodes) if decodes else None
    decoded = sum(max(s.num_output_tokens - 1, 0) for s in stats)
    return {"queue_time": min(s.queue_time for s in stats),
            "time_to_first_token": min(ttfts) if ttfts else None,
            "prefill_time": min(prefills) if prefills else None,
            "decode_time": decode_time, "e2e_latency": max(s.e2e_latency for s in stats),
            "decode_tokens_per_s": decoded / decode_time if decode_time and decoded else None}


TIMING_HEADERS = (("x-headwise-queue-time", "queue_time"), ("x-headwise-ttft", "time_to_first_token"),
                  ("x-headwise-prefill-time", "prefill_time"), ("x-headwise-decode-time", "decode_time"),
                  ("x-headwise-e2e-time", "e2e_latency"), ("x-headwise-decode-tokens-per-s", "decode_tokens_per_s"))


def timing_headers(t: dict | None) -> dict[str, str]:
    """x-headwise-* headers (seconds; rate in tokens/s) and a Server-Timing header (ms)."""
    if not t:
        return {}
    headers = {name: f"{t[key]:.6f}" for name, key in TIMING_HEADERS if t.get(key) is not None}
    parts = [f"{metric};dur={t[key] * 1000:.3f}" for metric, key in
             (("queue", "queue_time"), ("ttft", "time_to_first_token"), ("prefill", "prefill_time"),
              ("decode", "decode_time"), ("e2e", "e2e_latency")) if t.get(key) is not None]
    if parts:
        headers["server-timing"] = ", ".join(parts)
    return headers


def head_telemetry(finals: Sequence[TokenEvent | None]) -> dict | None:
    """The DESIGN.md contract object over the choices that carry telemetry (several choices:
    combine_request_telemetry, the row-weighted mean of their means); non-finite means are null."""
    parts = [ev.head_telemetry for ev in finals if ev is not None and ev.head_telemetry is not None]
    if not parts:
        return None
    return telemetry_json(combine_request_telemetry(parts))


def telemetry_json(telemetry: RequestHeadTelemetry) -> dict:
    """A RequestHeadTelemetry as JSON can carry it: its dict with non-finite means as null."""
    out = telemetry.to_dict()
    for name in STAT_NAMES:
        out[name] = [[_finite_or_none(v) for v in row] for row in out[name]]
    return out


def usage(choices: Sequence[ChoiceState], prompt_lengths: Sequence[int]) -> dict:
    """Prompt tokens count once per prompt (not once per choice), as OpenAI does. Choices are
    laid out prompt by prompt (index = prompt * n + i)."""
    completion = sum(c.num_tokens for c in choices)
    prompt = sum(prompt_lengths)
    n = max(1, len(choices) // max(1, len(prompt_lengths)))
    cached = sum(c.final.stats.num_cached_tokens for c in choices[::n]
                 if c.final is not None and c.final.stats is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def response_size(choices: Sequence[ChoiceState]) -> int:
    """Tokens plus their logprob alternatives in the choices: how much work their response is."""
    return sum(c.num_tokens * (1 + (len(c.logprobs[0].top) if c.logprobs else 0)) for c in choices)


def finish_reason(ev: TokenEvent | None) -> str | None:
    if ev is None or ev.finish_reason is None:
        return None
    return ev.finish_reason.value


# ------------------------------------------------------------------------------ formats
class CompletionFormat:
    """/v1/completions objects."""

    object = "text_completion"
    chunk_object = "text_completion"

    return_token_ids = False

    def __init__(self, token_str: TokenStrings, logprobs: int | None, echo_texts: Sequence[str] | None) -> None:
        self.token_str = token_str
        self.want_logprobs = logprobs is not None
        self.echo_texts = echo_texts

    def logprobs(self, choice: ChoiceState, lps: Sequence[TokenLogprob]) -> dict | None:
        if not self.want_logprobs:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            s = self.token_str(lp.token_id)
            tokens.append(s)
            token_lps.append(_lp(lp.logprob))
            top = {self.token_str(i): _lp(v) for i, v in lp.top}
            top.setdefault(s, _lp(lp.logprob))
            tops.append(top)
            offsets.append(choice.text_offset)
            choice.text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def start_chunks(self, choices: Sequence[ChoiceState]) -> list[dict]:
        if not self.echo_texts:
            return []
        return [{"index": c.index, "text": self.echo_texts[c.index], "logprobs": None, "finish_reason": None}
                for c in choices]

    def chunk_choice(self, choice: ChoiceState, delta: EventFold) -> dict:
        final = delta.final
        return {"index": choice.index, "text": delta.text, "logprobs": self.logprobs(choice, delta.logprobs),
                "finish_reason": finish_reason(final),
                **({"stop_reason": final.stop_reason} if final is not None else {})}

    def response_choice(self, choice: ChoiceState) -> dict:
        text = choice.text
        if self.echo_texts:
            text = self.echo_texts[choice.index] + text
        return {"index": choice.index, "text": text, "logprobs": self.logprobs(choice, choice.logprobs),
                "finish_reason": finish_reason(choice.final),
                "stop_reason": choice.final.stop_reason if choice.final is not None else None}


class ChatFormat:
    """/v1/chat/completions objects."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    return_token_ids = False

    def __init__(self, token_str: TokenStrings, logprobs: bool, top_logprobs: int) -> None:
        self.token_str = token_str
        self.want_logprobs = logprobs
        self.top_logprobs = top_logprobs

    def _entry(self, token_id: int, logprob: float) -> dict:
        s, raw = self.token_str.entry(token_id)
        return {"token": s, "logprob": _lp(logprob), "bytes": list(raw)}

    def logprobs(self, choice: ChoiceState, lps: Sequence[TokenLogprob]) -> dict | None:
        if not self.want_logprobs:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._entry(i, v) for i, v in lp.top[: self.top_logprobs]]}
                            for lp in lps]}

    def start_chunks(self, choices: Sequence[ChoiceState]) -> list[dict]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in choices]

    def chunk_choice(self, choice: ChoiceState, delta: EventFold) -> dict:
        final = delta.final
        return {"index": choice.index, "delta": {"content": delta.text} if delta.text or final is None else {},
                "logprobs": self.logprobs(choice, delta.logprobs), "finish_reason": finish_reason(final),
                **({"stop_reason": final.stop_reason} if final is not None else {})}

    def response_choice(self, choice: ChoiceState) -> dict:
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self.logprobs(choice, choice.logprobs), "finish_reason": finish_reason(choice.final),
                "stop_reason": choice.final.stop_reason if choice.final is not None else None}


# ------------------------------------------------------------------------------ assembling
def response_bytes(fmt, *, rid: str, created: int, model: str, choices: Sequence[ChoiceState],
                   prompt_lengths: Sequence[int], want_telemetry: bool) -> tuple[bytes, dict | None]:
    """The non-streaming response, encoded, and its timings. Each choice is built and encoded in
    turn, so the objects of at most one choice are alive at a time (a response of a million
    logprob entries never becomes a million live dicts for the garbage collector to walk)."""
    head = dumps({"id": rid, "object": fmt.object, "created": created, "model": model})
    tail: dict = {"usage": usage(choices, prompt_lengths)}
    _add_extras(tail, choices, want_telemetry)
    parts = [head[:-1], b',"choices":[']
    for i, c in enumerate(choices):
        obj = fmt.response_choice(c)
        if fmt.return_token_ids:
            obj["token_ids"] = c.token_ids
        parts.append((b"," if i else b"") + encode(obj))
    parts += [b"],", dumps(tail)[1:]]
    return b"".join(parts), tail["timings"]


async def sse_events(fmt, gen, *, rid: str, created: int, model: str, choices: list[ChoiceState],
                     prompt_lengths: Sequence[int], include_usage: bool, want_telemetry: bool
                     ) -> AsyncIterator[bytes]:
    """The SSE body: start chunks, one chunk per choice per wake-up, the final extras, [DONE].

    `gen` is a serving.Generation; closing this iterator early (client gone) aborts it."""
    head = {"id": rid, "object": fmt.chunk_object, "created": created, "model": model}
    try:
        start = fmt.start_chunks(choices)
        if start:  # one event per choice: clients read choices[0]
            yield b"".join(sse({**head, "choices": [c]}) for c in start)
        remaining = sum(1 for c in choices if not c.finished)
        while remaining:
            batch = await gen.next_batch()
            for index, ev in batch:
                choices[index].add(ev)
            out = []
            error = None
            for index, delta in coalesce(batch).items():
                choice = choices[index]
                if delta.final is not None and delta.final.finish_reason is FinishReason.ERROR:
                    error = delta.final.error or "generation failed"
                    break
                if delta.final is not None:
                    remaining -= 1
                obj = {**head, "choices": [fmt.chunk_choice(choice, delta)]}
                if fmt.return_token_ids:
                    obj["choices"][0]["token_ids"] = delta.token_ids
                if remaining == 0 and not include_usage:
                    _add_extras(obj, choices, want_telemetry)
                out.append(sse(obj))
            if error is not None:
                gen.close()
                yield b"".join(out) + error_event(f"generation failed: {error}")
                yield DONE
                return
            if out:
                yield b"".join(out)
        if include_usage:
            obj = {**head, "choices": [], "usage": usage(choices, prompt_lengths)}
            _add_extras(obj, choices, want_telemetry)
            yield sse(obj)
        yield DONE
    except SlowConsumer as exc:
        yield error_event(str(exc), code="slow_consumer")
        yield DONE
    except Exception as exc:  # noqa: BLE001 - after the headers went out, an error is an SSE event
        log.exception("stream %s failed", rid)
        gen.close()
        yield error_event(f"internal error while streaming ({type(exc).__name__})")
        yield DONE
    finally:
        gen.close()


def _add_extras(obj: dict, choices: Sequence[ChoiceState], want_telemetry: bool) -> None:
    """Put the choices' aggregates in a response object or last chunk: timings, and head_telemetry when asked."""
    obj["timings"] = timings([c.final.stats for c in choices if c.final is not None])
    if want_telemetry:
        obj["head_telemetry"] = head_telemetry([c.final for c in choices])
