"""Request state and the value types the engine hands to its clients (no torch here).

SamplingParams validates itself on construction and raises InvalidRequestError, so a bad
request is refused before anything is scheduled. The stream's events are in output.py.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from server.engine.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 300   # OpenAI's limit
MAX_LOGIT_BIAS = 100.0         # |bias| in [-100, 100], as OpenAI
# Temperatures below this act as greedy (vLLM's threshold): dividing logits by less overflows
# float32 to inf, and the draw would be greedy anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Temperatures above this act as this: the distribution is already flat to float precision.
MAX_EFFECTIVE_TEMPERATURE = 1e4
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop string or a stop token id
    LENGTH = "length"    # max_tokens or the context window
    ABORT = "abort"      # the client went away or abort() was called
    ERROR = "error"      # the engine failed this request; others continue


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}", param=name)
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be finite, got {value}", param=name)
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
    return value


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_GRAMMAR_CHARS = 64 * 1024


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a request's output (structured.py compiles it): kind is one of
    GRAMMAR_KINDS; value the JSON schema text, the regex, a JSON list of strings (choice) or a
    Lark grammar (json_object ignores it); param names the request field it came from, for errors."""

    kind: str
    value: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidRequestError(f"unknown grammar kind {self.kind!r}; one of {', '.join(GRAMMAR_KINDS)}",
                                      param=self.param)
        if not isinstance(self.value, str) or len(self.value) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"{self.param}: the grammar must be a string of at most {MAX_GRAMMAR_CHARS} "
                                      "characters", param=self.param)
        if self.kind != "json_object" and not self.value:
            raise InvalidRequestError(f"{self.param}: the {self.kind} must not be empty", param=self.param)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults: temperature 1, no truncation, no penalty.

    temperature 0 (or below GREEDY_BELOW_TEMPERATURE) is greedy; above MAX_EFFECTIVE_TEMPERATURE
    it acts as that value. top_k 0 (or -1) means off. max_tokens None means up to the context
    window. logprobs None means none; k >= 0 returns the sampled token's log-probability and
    the k most likely alternatives. seed makes sampling reproducible whatever else is batched.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    head_telemetry: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit before sampling)
    grammar: GrammarSpec | None = None  # structured output: the output must match it

    def __post_init__(self) -> None:
        if self.max_tokens is not None and _integer("max_tokens", self.max_tokens) < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if _finite("temperature", self.temperature) < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if not 0.0 < _finite("top_p", self.top_p) <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if _integer("top_k", self.top_k) < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}", param="top_k")
        if not 0.0 <= _finite("min_p", self.min_p) <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if _finite("repetition_penalty", self.repetition_penalty) <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                                      param="repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= _finite(name, getattr(self, name)) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}", param=name)
        if self.seed is not None:
            _integer("seed", self.seed)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a tuple of strings", param="stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidRequestError(f"stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters", param="stop")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidRequestError("stop_token_ids must be a tuple of integers", param="stop_token_ids")
        for t in self.stop_token_ids:
            if _integer("stop_token_ids", t) < 0:
                raise InvalidRequestError(f"stop_token_ids must be >= 0, got {t}", param="stop_token_ids")
        if _integer("min_tokens", self.min_tokens) < 0:
            raise InvalidRequestError(f"min_tokens must be >= 0, got {self.min_tokens}", param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                      param="min_tokens")
        if self.logprobs is not None and not 0 <= _integer("logprobs", self.logprobs) <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        self._check_logit_bias()
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise InvalidRequestError("grammar must be a GrammarSpec", param="grammar")

    def _check_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, tuple):
            raise InvalidRequestError("logit_bias must be a tuple of (token id, bias) pairs", param="logit_bias")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequestError(f"logit_bias holds at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
                                      f"got {len(self.logit_bias)}", param="logit_bias")
        seen = set()
        for entry in self.logit_bias:
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise InvalidRequestError("logit_bias entries must be (token id, bias) pairs", param="logit_bias")
            token, bias = entry
            if _integer("logit_bias", token) < 0 or token in seen:
                raise InvalidRequestError(f"logit_bias token ids must be distinct and >= 0, got {token}",
                                          param="logit_bias")
            seen.add(token)
            if not -MAX_LOGIT_BIAS <= _finite("logit_bias", bias) <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                          f"got {bias}", param="logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestStats:
    """Timings (seconds, time.monotonic based) and counts of one finished request."""

    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    queue_time: float
    time_to_first_token: float | None
    prefill_time: float | None
    decode_time: float | None
    e2e_latency: float
    inter_token_latencies: tuple[float, ...] = ()

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.decode_time is None or self.decode_time <= 0 or self.num_output_tokens < 2:
            return None
        return (self.num_output_tokens - 1) / self.decode_time


@dataclass
class Request:
    """Mutable state of one sequence inside the engine.

    token_ids holds the prompt followed by the generated tokens. The scheduler advances
    num_computed_tokens toward num_tokens; block_ids is the sequence's block table.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    seed: int = 0  # base of this request's per-position sampling seeds (params.seed, or drawn by the engine)
    internal: bool = False  # the server's own (warm-up): served normally, left out of all statistics
    grammar: object | None = None  # this request's grammar matcher (structured.py), when params.grammar
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
