"""Prompts: a synthetic set of exact input and output lengths, or a JSONL file.

Synthetic prompts start with a unique tag (so no two share a cached prefix) followed by common
English words, cut where the tokenizer counts exactly the asked number of tokens. JSONL lines are objects with "prompt" (text) or "messages" (chat), and
optionally "max_tokens" (or "output_len") for that request.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

from loadtests.records import Prompt
from loadtests.tokens import TokenCounter

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there one all we their been has when who will more no if out so "
         "said what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must "
         "through years where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between both life being "
         "under never day same another know while last might us great old year off come since against go "
         "came right used take three").split()

MAX_FIT_STEPS = 16  # cuts tried on each side of the binary search's answer
MAX_ATTEMPTS = 8


class DatasetError(ValueError):
    """A dataset that cannot give the requested prompts; the message says why."""


def fit_text(tag: str, target: int, counter: TokenCounter, rng: random.Random) -> str:
    """A text of exactly `target` tokens: the tag and random words, cut at the character where
    the count reaches the target (binary search; counts of prefixes grow almost monotonically),
    or at the nearest cut nearby that counts exactly; other random words when none does."""
    for _ in range(MAX_ATTEMPTS):
        text = _long_text(tag, target, counter, rng)
        lo, hi = len(tag), len(text)  # count(text[:hi]) >= target
        while lo < hi:
            mid = (lo + hi) // 2
            if counter.count(text[:mid]) >= target:
                hi = mid
            else:
                lo = mid + 1
        for cut in sorted(range(max(1, hi - MAX_FIT_STEPS), min(len(text), hi + MAX_FIT_STEPS) + 1),
                          key=lambda c: abs(c - hi)):
            if text[cut - 1] != " " and counter.count(text[:cut]) == target:
                return text[:cut]
    raise DatasetError(f"could not build a prompt of exactly {target} tokens (is the input length "
                       "smaller than the tag and the special tokens?)")


def _long_text(tag: str, target: int, counter: TokenCounter, rng: random.Random) -> str:
    """The tag and random words, at least `target` tokens long."""
    words = [tag]
    while len(words) <= 64 * (target + 1):
        words.extend(rng.choice(WORDS) for _ in range(max(target, 8)))
        text = " ".join(words)
        if counter.count(text) >= target:
            return text
    raise DatasetError(f"random words never reached {target} tokens")


def synthetic(count: int, input_len: int, output_len: int, counter: TokenCounter, *, seed: int = 0,
              chat: bool = False, first_index: int = 0) -> list[Prompt]:
    """`count` distinct prompts of exactly `input_len` tokens (as `counter` counts a completion
    prompt), each asking for `output_len` tokens. first_index keeps tags unique across calls."""
    if input_len < 2 or output_len < 1:
        raise DatasetError("synthetic prompts need --input-len >= 2 and --output-len >= 1")
    rng = random.Random(seed)
    prompts = []
    for i in range(first_index, first_index + count):
        text = fit_text(f"#{i}:", input_len, counter, rng)
        prompts.append(Prompt(text=None if chat else text,
                              messages=({"role": "user", "content": text},) if chat else None,
                              max_tokens=output_len, input_tokens=input_len))
    return prompts


def _read_lines(path: str) -> Iterator[tuple[int, dict]]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror}") from e
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{number}: not JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{number}: expected an object")
            yield number, obj


def from_jsonl(path: str, count: int, default_output_len: int, *, chat: bool = False) -> list[Prompt]:
    """The first `count` prompts of a JSONL file, cycled when it has fewer lines.
    A "prompt" line goes to the completions endpoint as text, or as a user message with chat;
    a "messages" line needs the chat endpoint."""
    rows = []
    for number, obj in _read_lines(path):
        out = obj.get("max_tokens", obj.get("output_len", default_output_len))
        if not isinstance(out, int) or out < 1:
            raise DatasetError(f"{path}:{number}: max_tokens must be a positive integer")
        if isinstance(obj.get("messages"), list) and obj["messages"]:
            if not chat:
                raise DatasetError(f"{path}:{number}: chat messages need --endpoint chat")
            rows.append(Prompt(text=None, messages=tuple(obj["messages"]), max_tokens=out))
        elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
            text = obj["prompt"]
            rows.append(Prompt(text=None if chat else text,
                               messages=({"role": "user", "content": text},) if chat else None, max_tokens=out))
        else:
            raise DatasetError(f"{path}:{number}: needs a non-empty \"prompt\" string or \"messages\" list")
        if len(rows) >= count:
            break
    if not rows:
        raise DatasetError(f"{path}: no prompts")
    return [rows[i % len(rows)] for i in range(count)]
