"""Incremental detokenization for streaming, with stop strings.

IncrementalDetokenizer turns one request's generated token ids into text as they arrive. Two
layers, each small:

1. Decoding (prefix_offset / read_offset window, as in Hugging Face TGI and vLLM's
   ``detokenize_incrementally``): each step decodes only the tokens since the last point where the
   text was complete, twice: ``decode(ids[prefix:read])`` (already emitted) and
   ``decode(ids[prefix:])`` (with the new tokens), and emits the difference. While the decoded
   text ends with U+FFFD (a multi-byte character split over several byte-level BPE or byte-fallback
   tokens) nothing is emitted, so a broken character never reaches the client. The window is seeded
   with the last few prompt tokens, so the first generated token keeps the word-boundary space that
   a decode of prompt + output would give it (SentencePiece's decoder strips the space of the first
   token of every decode call; with a prompt before it, that token is a prompt token). The cost per
   token is O(window), independent of the output length.

2. Stop strings: the text that could still be the start of a stop string (the longest suffix that
   is a proper prefix of one of them, fewer than the longest stop string's length) is held back and
   released by the next token or by finish(). A stop string may therefore begin in text of an
   earlier token and span several tokens. When the text contains a stop string, the emitted text
   ends right before it (or after it with include_stop_str_in_output), and the rest is dropped.
   Among several matches the one that ends first wins (ties: the one that starts first), which is
   what checking after every single character would find, so the result does not depend on how the
   text was split into tokens.

With skip_special_tokens, special tokens (added tokens flagged special, the ones the tokenizer's
decode skips) never enter the window: they produce no text and cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.engine.request import SamplingParams

# Prompt tokens that seed the decode window (TGI and vLLM use 5).
PROMPT_WINDOW_TOKENS = 5
# Pending tokens after which the decoder stops waiting for the text to end in a complete character
# and emits what is final. A real character is at most 4 bytes, so at most 4 tokens are ever
# pending for valid UTF-8; this only bounds the window when a model emits invalid byte sequences.
MAX_PENDING_TOKENS = 8

# Most tokens one character can span (UTF-8 is at most 4 bytes, every token at least one).
_MAX_CHAR_TOKENS = 4
# Tokens left pending when that happens (an incomplete character spans at most 3 of them).
_FORCE_KEEP_TOKENS = _MAX_CHAR_TOKENS

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class DetokenizerUpdate:
    """What one token adds to the stream.

    text is the new text safe to emit now (may be ""). stop_string is the stop string that
    matched (generation must end), else None.
    """

    text: str
    stop_string: str | None


def _skipped_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``tokenizer.decode(..., skip_special_tokens=True)`` drops: added tokens flagged special."""
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    return frozenset(int(i) for i, tok in added.items() if getattr(tok, "special", False))


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop string) of the match in text that ends first (ties: starts first), or None."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def _partial_stop_length(text: str, stops: Sequence[str], first_chars: frozenset[str], max_hold: int) -> int:
    """Length of the longest suffix of text (at most max_hold) that is a proper prefix of a stop string."""
    for length in range(min(max_hold, len(text)), 0, -1):
        if text[-length] not in first_chars:
            continue
        tail = text[-length:]
        if any(len(stop) > length and stop.startswith(tail) for stop in stops):
            return length
    return 0


class IncrementalDetokenizer:
    """Streams the text of one request's generated tokens and detects its stop strings.

    ``tokenizer`` is a transformers fast tokenizer (PreTrainedTokenizerFast / TokenizersBackend):
    only ``decode(ids, skip_special_tokens=...)`` and ``added_tokens_decoder`` are used. Call
    add_token once per generated token, then finish() if generation ended without a stop string.
    The concatenation of every update's text and finish() equals
    ``tokenizer.decode(output_ids, skip_special_tokens=params.skip_special_tokens)`` for ordinary
    text (up to the stop string when one matched; relative to the prompt for the first token's
    leading space, see the module docstring).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._skipped_ids = _skipped_token_ids(tokenizer) if self._skip_special else frozenset()
        self._stops = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._stop_first_chars = frozenset(s[0] for s in self._stops)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1

        seed, seed_text = self._seed(prompt_token_ids)
        # The decode window holds the ids from prefix_offset on (older ids are never needed again,
        # so prefix_offset is always 0 and not stored); ids before read_offset are already emitted.
        self._window: list[int] = seed
        self._read_offset = len(seed)
        self._prefix_text = seed_text   # decode(window[:read_offset]), kept until the window moves

        self._held = ""                    # decoded, not yet emitted (may start a stop string)
        self._stop_string: str | None = None
        self._finished = False

    # -- public API ---------------------------------------------------------------------------

    def add_token(self, token_id: int, match_stops: bool = True) -> DetokenizerUpdate:
        """Add one generated token; return the text it makes safe to emit and any matched stop string.

        match_stops False (a request still short of its min_tokens) releases the text without
        looking for stop strings, so none can end the output early.
        """
        if self._finished:
            raise RuntimeError("add_token() after the detokenizer finished (stop string or finish())")
        token_id = int(token_id)
        if token_id in self._skipped_ids:
            return DetokenizerUpdate("", None)
        self._window.append(token_id)
        return self._accept(self._decode_step(), final=False, match_stops=match_stops)

    def finish(self) -> str:
        """End of generation (not by stop string): flush pending tokens and held text; return it."""
        if self._finished:
            return ""
        pending = ""
        if self._read_offset < len(self._window):
            pending = self._decode(self._window)[len(self._prefix_text):]
        update = self._accept(pending, final=True)
        self._finished = True
        return update.text

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended generation, else None."""
        return self._stop_string

    # -- decoding window ------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special)

    def _seed(self, prompt_token_ids: Sequence[int]) -> tuple[list[int], str]:
        """The last PROMPT_WINDOW_TOKENS prompt tokens (skipped special tokens left out) and their text.

        The seed must decode cleanly: it is extended back (by up to _MAX_CHAR_TOKENS tokens) while
        it starts inside a multi-byte character, and shortened while it ends inside one (a prompt
        of token ids may end mid-character; then the output is decoded without that character).
        """
        tail: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(tail) == PROMPT_WINDOW_TOKENS + _MAX_CHAR_TOKENS:
                break
            if int(token_id) not in self._skipped_ids:
                tail.append(int(token_id))
        tail.reverse()
        start = max(0, len(tail) - PROMPT_WINDOW_TOKENS)
        text = self._decode(tail[start:])
        while start > 0 and text.startswith(_REPLACEMENT):
            start -= 1
            text = self._decode(tail[start:])
        seed = tail[start:]
        while seed and text.endswith(_REPLACEMENT):
            seed.pop()
            text = self._decode(seed)
        return seed, text

    def _advance(self, read_offset: int) -> None:
        """Mark the text of window[:read_offset] as emitted; the window then starts at the old read offset."""
        old_read = self._read_offset
        del self._window[:old_read]
        self._read_offset = read_offset - old_read
        self._prefix_text = self._decode(self._window[: self._read_offset])

    def _decode_step(self) -> str:
        """New complete text from the window (prefix_offset/read_offset technique); "" while incomplete."""
        text = self._decode(self._window)
        if len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT):
            delta = text[len(self._prefix_text):]
            self._advance(len(self._window))
            return delta
        if len(self._window) - self._read_offset >= MAX_PENDING_TOKENS:
            return self._force_step(text)
        return ""

    def _force_step(self, text: str) -> str:
        """Emit the settled part of a long run that never decodes to a complete character (invalid bytes).

        The last _FORCE_KEEP_TOKENS stay pending (room for a character still being completed). The
        cut is the last token boundary before them where the window's text splits exactly
        (decode(head) + decode(tail) == decode(window)), so the decoder's state is clean there and
        the head's text cannot change with later tokens. Without such a boundary nothing is forced.
        """
        for cut in range(len(self._window) - _FORCE_KEEP_TOKENS, self._read_offset, -1):
            head = self._decode(self._window[:cut])
            if len(head) < len(self._prefix_text) or head + self._decode(self._window[cut:]) != text:
                continue
            delta = head[len(self._prefix_text):]
            self._advance(cut)
            return delta
        return ""

    # -- stop strings ---------------------------------------------------------------------------

    def _accept(self, new_text: str, final: bool, match_stops: bool = True) -> DetokenizerUpdate:
        """Append new_text to the held text, look for stop strings, and release what is safe."""
        if not new_text and not final:
            return DetokenizerUpdate("", None)
        text = self._held + new_text
        if not match_stops:
            self._held = ""
            return DetokenizerUpdate(text, None)
        match = _find_stop(text, self._stops) if self._stops else None
        if match is not None:
            start, stop = match
            out = text[: start + len(stop)] if self._include_stop else text[:start]
            self._held = ""
            self._stop_string = stop
            self._finished = True
            return DetokenizerUpdate(out, stop)
        hold = 0 if final or not self._stops else _partial_stop_length(
            text, self._stops, self._stop_first_chars, self._max_hold)
        out, self._held = (text[:-hold], text[-hold:]) if hold else (text, "")
        return DetokenizerUpdate(out, None)
