"""What a request's stream carries: TokenEvent, and EventFold, which folds events into one result.

TokenEvent is one update of one request's stream; EventFold is the single place where a
sequence of them is added up (the engine's Completion, the API's choices and its coalesced
stream chunks all fold the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.request import FinishReason, RequestStats, TokenLogprob
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
