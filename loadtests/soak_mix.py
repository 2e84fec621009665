"""The soak's request mix: pure functions from (seeded random.Random, MixSpec) to Actions.

Kinds (each with a few variants):
    stream          a streamed completion or chat answer, read to [DONE]
    nonstream       the same, not streamed
    disconnect      a stream the client closes after 1-5 data events (mid-stream abort)
    prefill_abort   a long prompt, and the client leaves at once: a stream closed as soon as the
                    status line arrives, or a non-streamed request given up after 50-500 ms
    invalid         bad JSON, wrong types, NaN / Infinity, bad UTF-8, out-of-range values (-> 400)
    over_context    prompt (+ max_tokens) over the context window: text, token ids, max_tokens (-> 400)
    over_body       a body over the server's limit, with and without Content-Length (-> 413)
Overload bursts (burst()) are sent on a timer beside the mix, not drawn from it. Any request
may also get 503 (queue full) while a burst holds the server's admission slots.

The same seed and worker give the same sequence of Actions (timing aside).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtests.soak_records import Action

KINDS = ("stream", "nonstream", "disconnect", "prefill_abort", "invalid", "over_context", "over_body")
DEFAULT_WEIGHTS: Mapping[str, float] = {"stream": 30, "nonstream": 20, "disconnect": 10, "prefill_abort": 8,
                                        "invalid": 16, "over_context": 10, "over_body": 6}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_OR_BUSY = frozenset({200, 503})
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "river", "while", "light", "rain",
         "fell", "over", "old", "town", "where", "people", "walked", "slowly", "past", "small", "shops",
         "selling", "bread", "fruit", "books", "maps", "of", "distant", "places", "nobody", "had", "seen")


@dataclass(frozen=True)
class MixSpec:
    """What the mix needs to know about the server."""

    model: str | None               # sent as "model" (None: omitted)
    max_model_len: int              # the context window, tokens
    max_body_bytes: int             # the server's body limit
    max_tokens: int = 32            # most output tokens of a normal request
    tokens_per_word: float = 1.5    # calibrated against POST /tokenize when the server has it
    token_ids: tuple[int, ...] = (1, 2, 3)  # valid ids for token-id prompts
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    @property
    def long_prompt_words(self) -> int:
        """Words of a prompt that fills about half the window (at most ~1,024 tokens)."""
        tokens = min(self.max_model_len // 2, 1024)
        return max(8, int(tokens / max(self.tokens_per_word, 1e-3)))

    def room(self, prompt_words: int) -> int:
        """Output tokens that surely fit after a prompt of prompt_words (chat template included)."""
        used = math.ceil(prompt_words * self.tokens_per_word) + 64
        return max(1, self.max_model_len - used)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _request(spec: MixSpec, path: str, prompt: Any, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {} if spec.model is None else {"model": spec.model}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(fields)
    return body


def _sampling(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"temperature": 0.0}
    return {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**31)}


# ----------------------------------------------------------------------------- normal requests
def _normal(rng: random.Random, spec: MixSpec, variant: str, stream: bool) -> Action:
    n_words = rng.randint(4, 48)
    max_tokens = min(rng.randint(1, spec.max_tokens), spec.room(n_words))
    path = CHAT if variant == "chat" else COMPLETIONS
    prompt: Any = words(rng, n_words)
    if variant == "token_ids":
        prompt = [rng.choice(spec.token_ids) for _ in range(n_words)]
    n = 2 if variant == "n2" else 1
    fields: dict[str, Any] = {"max_tokens": max_tokens, "n": n, "ignore_eos": rng.random() < 0.5,
                              **_sampling(rng)}
    if stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    return Action(kind="stream" if stream else "nonstream", variant=variant, path=path,
                  body=_json(_request(spec, path, prompt, **fields)), expect=OK_OR_BUSY, stream=stream, choices=n)


NORMAL_VARIANTS = ("completions", "chat", "n2", "token_ids")


def stream(rng: random.Random, spec: MixSpec, variant: str) -> Action:
    return _normal(rng, spec, variant, stream=True)


def nonstream(rng: random.Random, spec: MixSpec, variant: str) -> Action:
    return _normal(rng, spec, variant, stream=False)


def disconnect(rng: random.Random, spec: MixSpec, variant: str) -> Action:
    """A long stream (ignore_eos) the client closes after a few data events."""
    n_words = rng.randint(4, 32)
    path = CHAT if variant == "chat" else COMPLETIONS
    body = _request(spec, path, words(rng, n_words), max_tokens=min(4 * spec.max_tokens, spec.room(n_words)),
                    ignore_eos=True, stream=True, **_sampling(rng))
    return Action(kind="disconnect", variant=variant, path=path, body=_json(body), expect=OK_OR_BUSY, stream=True,
                  read_events=rng.randint(1, 5))


def prefill_abort(rng: random.Random, spec: MixSpec, variant: str) -> Action:
    """A long prompt; the client leaves before (or while) the server prefills it."""
    n_words = spec.long_prompt_words
    streamed = variant == "stream_at_headers"
    fields: dict[str, Any] = {"max_tokens": min(16, spec.room(n_words)), "temperature": 0.0}
    if streamed:
        fields["stream"] = True
    body = _request(spec, COMPLETIONS, words(rng, n_words), **fields)
    return Action(kind="prefill_abort", variant=variant, path=COMPLETIONS, body=_json(body), expect=OK_OR_BUSY,
                  stream=streamed, close_at_headers=streamed,
                  cancel_after=None if streamed else round(rng.uniform(0.05, 0.5), 3))


# ----------------------------------------------------------------------------- refusals
def _invalid_bodies(rng: random.Random, spec: MixSpec) -> dict[str, tuple[str, bytes]]:
    model = {} if spec.model is None else {"model": spec.model}
    short = words(rng, 3)
    return {
        "bad_json": (COMPLETIONS, b'{"prompt": "' + short.encode() + b'", "max_tokens": '),
        "wrong_types": (COMPLETIONS, _json({**model, "prompt": 5, "max_tokens": "many"})),
        "nan": (COMPLETIONS, b'{"prompt": "' + short.encode() + b'", "temperature": NaN}'),
        "infinity": (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}'),
        "not_object": (COMPLETIONS, b"[1, 2, 3]"),
        "bad_utf8": (COMPLETIONS, b'{"prompt": "\xff\xfe' + short.encode() + b'"}'),
        "missing_prompt": (COMPLETIONS, _json({**model, "max_tokens": 3})),
        "out_of_range": (COMPLETIONS, _json({**model, "prompt": short, "max_tokens": -1, "top_p": 2})),
        "bad_token_id": (COMPLETIONS, _json({**model, "prompt": [2**40], "max_tokens": 2})),
        "chat_wrong_messages": (CHAT, _json({**model, "messages": "hello", "max_tokens": 2})),
        "empty": (COMPLETIONS, b""),
    }


INVALID_VARIANTS = ("bad_json", "wrong_types", "nan", "infinity", "not_object", "bad_utf8", "missing_prompt",
                    "out_of_range", "bad_token_id", "chat_wrong_messages", "empty")


def invalid(rng: random.Random, spec: MixSpec, variant: str) -> Action:
    path, body = _invalid_bodies(rng, spec)[variant]
    return Action(kind="invalid", variant=variant, path=path, body=body, expect=frozenset({400}))


def over_context(rng: random.Random, spec: MixSpec, variant: str) -> Action:
    """Over the window: every word is at least one token, so window + 64 words is always too long."""
    window = spec.max_model_len
    if variant == "long_prompt":
        body = _request(spec, COMPLETIONS, words(rng, window + 64), max_tokens=4)
    elif variant == "token_ids":
        ids = [spec.token_ids[i % len(spec.token_ids)] for i in range(window + 1)]
        body = _request(spec, COMPLETIONS, ids, max_tokens=4)
    else:  # "max_tokens": a short prompt asking for the whole window
        body = _request(spec, COMPLETIONS, words(rng, 4), max_tokens=window)
    return Action(kind="over_context", variant=variant, path=COMPLETIONS, body=_json(body),
                  expect=frozenset({400, 503}))


OVER_CONTEXT_VARIANTS = ("long_prompt", "token_ids", "max_tokens")


def over_body(rng: random.Random, spec: MixSpec, variant: str) -> Action:
    """A JSON body 1 KiB over the limit; "chunked" sends it without Content-Length."""
    filler = "x" * (spec.max_body_bytes + 1024)
    body = _json(_request(spec, COMPLETIONS, filler, max_tokens=1))
    return Action(kind="over_body", variant=variant, path=COMPLETIONS, body=body, expect=frozenset({413}),
                  chunked=variant == "chunked")


Builder = Callable[[random.Random, MixSpec, str], Action]
VARIANTS: Mapping[str, tuple[Builder, tuple[str, ...]]] = {
    "stream": (stream, NORMAL_VARIANTS),
    "nonstream": (nonstream, NORMAL_VARIANTS),
    "disconnect": (disconnect, ("completions", "chat")),
    "prefill_abort": (prefill_abort, ("stream_at_headers", "nonstream_cancel")),
    "invalid": (invalid, INVALID_VARIANTS),
    "over_context": (over_context, OVER_CONTEXT_VARIANTS),
    "over_body": (over_body, ("content_length", "chunked")),
}


# ----------------------------------------------------------------------------- sequences
def next_action(rng: random.Random, spec: MixSpec) -> Action:
    """One Action drawn by the spec's weights (kind, then a uniform variant)."""
    kinds = [k for k in KINDS if spec.weights.get(k, 0) > 0]
    kind = rng.choices(kinds, weights=[spec.weights[k] for k in kinds])[0]
    build, variants = VARIANTS[kind]
    return build(rng, spec, rng.choice(variants))


def tour(rng: random.Random, spec: MixSpec) -> list[Action]:
    """Every variant of every weighted kind once, in a fixed order: the first worker starts with
    it, so every code path runs before the RSS warm-up ends."""
    return [build(rng, spec, v) for k, (build, variants) in VARIANTS.items() if spec.weights.get(k, 0) > 0
            for v in variants]


def plan(spec: MixSpec, seed: int, worker: int) -> Iterator[Action]:
    """Worker `worker`'s endless, reproducible sequence (the caller bounds it)."""
    rng = random.Random(f"soak:{seed}:{worker}")
    if worker == 0:
        yield from tour(rng, spec)
    while True:
        yield next_action(rng, spec)


def burst(rng: random.Random, spec: MixSpec, size: int, max_tokens: int) -> list[Action]:
    """`size` short streams (ignore_eos, max_tokens each) to be sent at once, past the server's
    admission capacity: some get 503 with Retry-After, the admitted ones must finish."""
    out = []
    for _ in range(size):
        body = _request(spec, COMPLETIONS, words(rng, rng.randint(2, 8)), max_tokens=max_tokens, ignore_eos=True,
                        temperature=0.0, stream=True)
        out.append(Action(kind="burst", variant="stream", path=COMPLETIONS, body=_json(body), expect=OK_OR_BUSY,
                          stream=True))
    return out


def parse_weights(text: str) -> dict[str, float]:
    """"stream=30,invalid=10" -> the default weights with those replaced (0 switches a kind off)."""
    weights = dict(DEFAULT_WEIGHTS)
    for item in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = item.partition("=")
        if not sep or kind.strip() not in KINDS:
            raise ValueError(f"{item!r}: expected KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: the weight must be a number") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{item!r}: the weight must be >= 0")
        weights[kind.strip()] = w
    if not any(weights.values()):
        raise ValueError("at least one kind needs a weight > 0")
    return weights
