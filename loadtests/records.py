"""The dataclasses passed between the load-test layers: prompts in, timings out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """One request to send: a completion prompt (text) or chat messages, and its output length."""

    text: str | None
    messages: tuple[dict, ...] | None
    max_tokens: int
    input_tokens: int | None = None  # as counted by the tokenizer when the dataset made it


@dataclass(frozen=True)
class Chunk:
    """A streamed event that carried tokens: when it arrived and how many tokens it carried."""

    time: float
    tokens: int


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request (times: time.perf_counter seconds)."""

    ok: bool
    send_time: float
    end_time: float
    chunks: tuple[Chunk, ...]
    output_tokens: int  # the server's usage.completion_tokens when it reported one, else counted
    prompt_tokens: int | None  # the server's usage.prompt_tokens, when reported
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class LoadPoint:
    """One load level: a concurrency cap (None: unbounded) and a request rate (None: all at once)."""

    concurrency: int | None
    request_rate: float | None

    @property
    def label(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        parts.append(f"rate {self.request_rate:g}/s" if self.request_rate is not None else "rate inf")
        return ", ".join(parts)


@dataclass(frozen=True)
class RunRecord:
    """All requests of one load point and the wall-clock window they ran in."""

    point: LoadPoint
    requests: tuple[RequestRecord, ...]
    start_time: float
    end_time: float
    stopped_early: bool  # the time limit ended the run before every request finished

    @property
    def duration(self) -> float:
        return max(self.end_time - self.start_time, 1e-9)
