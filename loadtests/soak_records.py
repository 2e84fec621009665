"""The dataclasses of a soak run: what was sent, what came back, what was sampled, what was judged.

Times are seconds since the start of the load (time.monotonic based), sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Statuses any request of the mix may get; anything else fails the soak (DESIGN.md "API behaviour").
ALLOWED_STATUSES = frozenset({400, 413, 503})  # and every 2xx


def status_allowed(status: int) -> bool:
    return 200 <= status < 300 or status in ALLOWED_STATUSES


@dataclass(frozen=True)
class Action:
    """One request of the mix, fully decided before it is sent (so a seed reproduces the mix)."""

    kind: str                       # see soak_mix.KINDS, or "burst"
    variant: str                    # which flavour of the kind (e.g. "bad_json", "chunked", "chat")
    path: str                       # /v1/completions or /v1/chat/completions
    body: bytes                     # sent as is (invalid bodies are not JSON)
    expect: frozenset[int]          # statuses that are right for this request
    stream: bool = False
    choices: int = 1                # choices a finished answer must carry
    read_events: int | None = None  # stream: close the connection after this many data events
    close_at_headers: bool = False  # stream: close as soon as the status line arrives (abort in prefill)
    cancel_after: float | None = None  # non-stream: give up (disconnect) after this many seconds
    chunked: bool = False           # send without Content-Length


@dataclass(frozen=True)
class Outcome:
    """What the client saw of one Action."""

    kind: str
    variant: str
    start: float
    end: float
    status: int | None              # None: the client left (on purpose) or the transport failed first
    expected: bool | None = None    # the status is one the Action expects (None: no status)
    admitted: bool = False          # 2xx: the server took the request
    finished: bool | None = None    # admitted and read to the end: every choice had a finish_reason
                                    # (and a stream ended with [DONE]); None when not admitted or
                                    # when the client left on purpose
    left_on_purpose: bool = False   # a client disconnect that the mix asked for
    retry_after: bool | None = None  # 503 only: a Retry-After header came with it
    code: str | None = None         # the error object's code, for 4xx/5xx
    error: str | None = None        # a client-side fault: hung (timed out), transport error, stream error


@dataclass(frozen=True)
class Sample:
    """One look at the server process and its /metrics (None: could not be read)."""

    t: float
    rss_bytes: int | None
    fds: int | None
    threads: int | None
    kv_blocks_in_use: float | None
    running: float | None
    waiting: float | None


@dataclass(frozen=True)
class Probe:
    """One GET /health by the dedicated prober: its latency (None when it failed) and status."""

    t: float
    latency: float | None
    status: int | None
    error: str | None = None


@dataclass(frozen=True)
class Drain:
    """After the load: how long the KV blocks took to come back, and what was left."""

    seconds: float
    kv_blocks_in_use: float | None
    running: float | None
    waiting: float | None


@dataclass(frozen=True)
class SoakResult:
    duration: float                 # seconds of load asked for
    elapsed: float                  # seconds from the first request to the end of the drain
    outcomes: tuple[Outcome, ...]
    bursts: tuple[tuple[Outcome, ...], ...]  # each burst's requests (also in outcomes)
    samples: tuple[Sample, ...]
    probes: tuple[Probe, ...]
    start: Sample                   # before the load
    end: Sample                     # after the drain, with the load's connections closed
    drain: Drain
    server_alive: bool              # the server process was still there at the end
    server_exit: int | None = None  # exit status after SIGTERM, when the soak launched it
    counters: dict = field(default_factory=dict)  # the server's counter deltas (/metrics), when available
