"""From sampled ids to what a request's stream carries.

OutputProcessor turns each sampled token id into text and a finish decision (incremental
detokenization, stop tokens and strings, lengths); TokenEvent is one update of one request's
stream; EventFold is the single place where a sequence of events is added up (the engine's
Completion, the API's choices and its coalesced stream chunks all fold the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import FinishReason, Request, RequestStats, TokenLogprob
from server.engine.structured import advance
from server.engine.telemetry import RequestHeadTelemetry


@dataclass(frozen=True)
class TokenEvent:
    """One update of one request's stream: new tokens and their text, or the end of the stream.

    text is the newly decodable text (never a broken UTF-8 character; stop strings trimmed).
    The final event has finished=True, a finish_reason, stats, and head_telemetry when asked.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    stats: RequestStats | None = None
    head_telemetry: RequestHeadTelemetry | None = None
    error: str | None = None


@dataclass
class EventFold:
    """Events of one stream added up in order: text pieces, token ids, logprobs, the final event."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: TokenEvent | None = None

    def add(self, ev: TokenEvent) -> None:
        if ev.text:
            self.texts.append(ev.text)
        self.token_ids.extend(ev.token_ids)
        if ev.logprobs:
            self.logprobs.extend(ev.logprobs)
        if ev.finished:
            self.final = ev

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return "".join(self.texts)


# stop_reason of a request whose grammar could not be continued (its text so far is returned)
GRAMMAR_DEAD_END = "grammar_dead_end"


@dataclass(frozen=True)
class TextUpdate:
    """What one sampled token does to its request: the text it releases and whether it ends it."""

    text: str
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None   # the stop string or stop token id that matched


class OutputProcessor:
    """Sampled token ids -> text and finish decisions, one incremental detokenizer per request.

    Finish rules, in order: an EOS token (unless ignore_eos) or a stop token id ends the request
    with STOP and adds no text; with a grammar, a token that completes it ends the request with
    STOP (its text included), one it cannot take ends it with STOP and stop_reason
    GRAMMAR_DEAD_END; a stop string ends it with STOP (stop strings are looked for from
    the min_tokens-th output token on: earlier text is released unchecked); reaching
    max_tokens or the context window ends it with LENGTH. Text still held back (a possible stop
    string's start, an incomplete character) is flushed when a request ends other than by a stop
    string. Runs on the engine's step thread: its cost per token is measured in BENCHMARKS.md.
    """

    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, req: Request) -> None:
        self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params)

    def process(self, req: Request, token_id: int) -> TextUpdate:
        """req already holds token_id as its last token."""
        p = req.params
        detok = self._detok[req.request_id]
        if token_id in req.eos_token_ids and not p.ignore_eos:
            dead = req.grammar is not None and req.grammar.is_error()
            return TextUpdate(detok.finish(), FinishReason.STOP, GRAMMAR_DEAD_END if dead else None)
        if token_id in p.stop_token_ids:
            return TextUpdate(detok.finish(), FinishReason.STOP, token_id)
        if req.grammar is not None:
            step = advance(req.grammar, token_id)
            if step.dead_end:
                return TextUpdate(detok.finish(), FinishReason.STOP, GRAMMAR_DEAD_END)
            if step.complete:
                return TextUpdate(detok.add_token(token_id, match_stops=False).text + detok.finish(), FinishReason.STOP)
        update = detok.add_token(token_id, match_stops=req.num_output_tokens >= p.min_tokens)
        if update.stop_string is not None:
            return TextUpdate(update.text, FinishReason.STOP, update.stop_string)
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return TextUpdate(update.text + detok.finish(), FinishReason.LENGTH)
        return TextUpdate(update.text)

    def flush(self, request_id: str) -> str:
        """Held-back text of a request that ends early (abort)."""
        detok = self._detok.get(request_id)
        return detok.finish() if detok is not None else ""

    def remove(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
