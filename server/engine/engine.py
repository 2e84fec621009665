"""The engine: add requests, step (schedule -> run -> output), stream each request's tokens.

The engine composes the pieces and runs the loop; it builds no tensors itself. InputProcessor
(inputs.py) turns prompts into validated token ids; Scheduler (scheduler.py, with the
BlockManager) picks each step's tokens; ModelRunner (runner.py) owns the device: model, KV
cache, attention backend, step buffers; OutputProcessor (output.py) turns sampled ids into text
and finish decisions; telemetry.py aggregates the per-head statistics.

Use it inline from one thread (`stream()` drives the steps itself), or call `start()` to run
the loop on a background thread and read streams from any thread or asyncio task. All engine
state is touched only by the thread that steps; add_request() and abort() from other threads
go through an inbox that is applied between steps. A failing step fails only the requests in
it; the loop goes on.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from server.config import EngineConfig
from server.engine.block_manager import BlockManager
from server.engine.errors import EngineDeadError, InvalidRequestError, UnknownRequestError
from server.engine.inputs import InputProcessor
from server.engine.loader import LoadedModel, load_model
from server.engine.output import EventFold, OutputProcessor, TokenEvent
from server.engine.request import FinishReason, GrammarSpec, Request, RequestStats, RequestStatus, SamplingParams
from server.engine.runner import ModelRunner, StepOutput
from server.engine.scheduler import Batch, ScheduledRequest, Scheduler
from server.engine.streams import RequestStream, Wakeups
from server.engine.telemetry import HeadStats, HeadStatsAccumulator, RequestHeadTelemetry, RequestTelemetry
from server.engine.telemetry_buffer import PendingStep, RowOwner, TelemetryBuffer

log = logging.getLogger("headwise.engine")


# Why the engine ended a request with FinishReason.ERROR (a label of the error counter).
ERROR_REASONS = ("step_failed", "nonfinite_logits", "update_failed")


@dataclass(frozen=True)
class FinishedRequest:
    """A request that ended in a step (for publishers). head_telemetry: its per-head means,
    whenever telemetry ran for it (whether or not the client asked to receive them)."""

    request_id: str
    finish_reason: FinishReason
    stats: RequestStats
    head_telemetry: RequestHeadTelemetry | None
    error_reason: str | None = None  # for FinishReason.ERROR: one of ERROR_REASONS


@dataclass(frozen=True)
class StepStats:
    """What one step did (for publishers): load after it, the latencies observed in it, the
    requests that ended in it, and on sampled steps each layer's attention time."""

    num_scheduled_tokens: int
    num_sampled: int
    num_preempted: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    step_time: float
    telemetry: bool
    time_to_first_token: tuple[float, ...] = ()   # seconds, requests whose first token came in this step
    inter_token_latencies: tuple[float, ...] = ()  # seconds, one per later token of this step
    finished: tuple[FinishedRequest, ...] = ()
    attention_times: tuple[float, ...] | None = None  # seconds per layer, on timed steps


class _Sampler:
    """Picks a steady fraction `rate` of calls (every 1/rate-th, no randomness); rate 0 never."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._credit = 0.0

    def due(self) -> bool:
        if self.rate <= 0.0:
            return False
        self._credit += self.rate
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False


@dataclass(frozen=True)
class EngineStats:
    """Counters since start and current load (for publishers)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    num_free_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    steps: int


@dataclass(frozen=True)
class Completion:
    """A finished request, as generate() returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    stop_reason: str | int | None
    stats: RequestStats
    head_telemetry: object | None
    logprobs: tuple | None


class _Live:
    """Engine-side companions of a request: its stream and telemetry sums."""

    def __init__(self, request: Request, stream: RequestStream, telemetry: RequestTelemetry | None) -> None:
        self.request = request
        self.stream = stream
        self.telemetry = telemetry


class Engine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None,
                 progress=None) -> None:
        self.config = config = config or EngineConfig()
        loaded = loaded or load_model(config.model, progress=progress)
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        # the runner keeps what its kernels need; the loaded tensors are not held past here
        self.runner = ModelRunner(config, mc, loaded.weights, loaded.quantized, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.inputs = InputProcessor(self.tokenizer, mc.vocab_size, self.max_model_len)
        self.output = OutputProcessor(self.tokenizer, self.max_model_len)
        tc = config.telemetry
        self.head_stats = HeadStatsAccumulator(mc.num_layers, mc.num_heads, tc.histogram_buckets,
                                               per_head_histograms=tc.per_head_histograms)
        self._telemetry_rows = TelemetryBuffer(self.head_stats)
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self._live: dict[str, _Live] = {}             # requests the engine still works on
        self._streams: dict[str, RequestStream] = {}  # streams not yet read to their end
        self._inbox: list[tuple[str, object]] = []
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._telemetry_sampler = _Sampler(tc.sample_rate if tc.enabled else 0.0)
        self._timing_sampler = _Sampler(tc.attention_time_sample_rate)
        self._observers: list[Callable[[StepStats], None]] = []
        self._step_ttft: list[float] = []
        self._step_itl: list[float] = []
        self._step_finished: list[FinishedRequest] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._step_lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0

    # -- requests ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.inputs.tokenize(text)

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Token ids of messages rendered through the model's chat template."""
        return self.inputs.chat_prompt(messages, add_generation_prompt, **template_kwargs)

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile spec into the grammar cache now (any thread; InvalidRequestError when it is
        bad), so that add_request with it only copies the compiled grammar."""
        self.inputs.grammars.matcher(spec)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, internal: bool = False) -> str:
        """Validate and queue a request; returns its id. Raises InvalidRequestError (or
        ContextLengthExceededError) before anything is scheduled. An internal request (the
        server's warm-up) is served like any other but counted in no statistic."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop stopped: {self._dead}")
        params = params or SamplingParams()
        if isinstance(params, SamplingParams) is False:
            raise InvalidRequestError("params must be SamplingParams", param="params")
        prepared = self.inputs.prepare(prompt, params)
        ids = prepared.token_ids
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self._inbox_lock:
            if rid in self._live or rid in self._streams:
                raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
            req = Request(request_id=rid, prompt_token_ids=ids, params=params, arrival_time=time.monotonic(),
                          max_tokens=prepared.max_tokens, eos_token_ids=self.eos_token_ids,
                          seed=params.seed if params.seed is not None else self._rng.getrandbits(63),
                          internal=internal, grammar=prepared.grammar)
            mc = self.model_config
            # kept for every request while telemetry is on: publishers show recent requests' heads
            telemetry = (RequestTelemetry(mc.num_layers, mc.num_heads, mc.num_kv_heads)
                         if self.config.telemetry.enabled or params.head_telemetry else None)
            stream = RequestStream(rid, ids)
            self.output.add(req)
            self._live[rid] = _Live(req, stream, telemetry)
            self._streams[rid] = stream
            self._inbox.append(("add", req))
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason ABORT and its blocks are freed.
        Unknown or finished ids are ignored."""
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        with self._inbox_lock:
            return bool(self._inbox) or self.scheduler.has_work()

    def add_observer(self, observer: Callable[[StepStats], None]) -> None:
        """Call observer(StepStats) on the stepping thread after every step that ran a batch or
        ended a request. Keep it cheap; an observer that raises is logged and skipped."""
        self._observers.append(observer)

    def step(self) -> list[TokenEvent]:
        """One iteration: apply the inbox, schedule, run, update. Returns the events emitted."""
        with self._step_lock:
            t0 = time.monotonic()
            self._step_ttft, self._step_itl, self._step_finished = [], [], []
            events = self._apply_inbox()
            batch = self.scheduler.schedule()
            out, telemetry = None, False
            if not batch.empty:
                now = time.monotonic()
                for s in batch.scheduled:
                    if s.request.first_scheduled_time is None:
                        s.request.first_scheduled_time = now
                telemetry = self._telemetry_sampler.due()
                runs, failed = self._execute(batch.scheduled, telemetry, self._timing_sampler.due())
                events.extend(failed)
                for part, run in runs:
                    events.extend(self._update(part, run))
                if runs:
                    out = runs[0][1] if len(runs) == 1 else StepOutput(
                        sampled=tuple(t for _, r in runs for t in r.sampled), telemetry=None,
                        num_tokens=sum(r.num_tokens for _, r in runs))
                    self.steps += 1
            if out is not None or self._step_finished:
                step = StepStats(
                    num_scheduled_tokens=out.num_tokens if out else 0, num_sampled=len(out.sampled) if out else 0,
                    num_preempted=len(batch.preempted), num_running=self.scheduler.num_running,
                    num_waiting=self.scheduler.num_waiting, kv_cache_usage=self.block_manager.usage,
                    step_time=time.monotonic() - t0, telemetry=telemetry,
                    time_to_first_token=tuple(self._step_ttft), inter_token_latencies=tuple(self._step_itl),
                    finished=tuple(self._step_finished), attention_times=out.attention_times if out else None)
                self._notify(step)
            return self._publish(events)

    def _execute(self, scheduled: Sequence[ScheduledRequest], telemetry: bool, timed: bool
                 ) -> tuple[list[tuple[Batch, StepOutput]], list[TokenEvent]]:
        """Run one step's requests. When the step fails, run it again in halves until each failure
        is pinned on one request, end only those (with an error of their own: no other request's
        exception text) and serve the rest. A step's side effects before sampling (K/V written
        into the batch's own slots) are the same when it runs again, and seeded sampling does
        not depend on the batch, so the requests that go on produce what they would have."""
        part = Batch(tuple(scheduled), ())
        try:
            return [(part, self.runner.execute(part, telemetry, time_attention=timed))], []
        except Exception as exc:
            if len(scheduled) == 1:
                req = scheduled[0].request
                log.exception("request %s fails every step it runs in; ending it", req.request_id)
                return [], [self._finish(req, FinishReason.ERROR, error_reason="step_failed",
                                         error=f"the engine could not run this request ({type(exc).__name__}); "
                                               "it was ended so that the others could go on")]
            log.warning("step of %d requests failed (%s: %s); running it again in halves to find the cause",
                        len(scheduled), type(exc).__name__, exc)
        half = len(scheduled) // 2
        first, failed_first = self._execute(scheduled[:half], telemetry, False)
        second, failed_second = self._execute(scheduled[half:], telemetry, False)
        return first + second, failed_first + failed_second

    def _notify(self, step: StepStats) -> None:
        for observer in self._observers:
            try:
                observer(step)
            except Exception:  # a publisher's bug must not stop serving
                log.exception("step observer %r failed", observer)

    def _apply_inbox(self) -> list[TokenEvent]:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        events = []
        for kind, item in inbox:
            if kind == "add":
                self.scheduler.add(item)
            else:
                live = self._live.get(item)
                if live is not None and not live.request.is_finished:
                    events.append(self._finish(live.request, FinishReason.ABORT))
        return events

    def _update(self, batch: Batch, out: StepOutput) -> list[TokenEvent]:
        bm = self.block_manager
        for s in batch.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            req.num_committed_blocks = bm.commit(req.block_ids, req.token_ids, req.num_computed_tokens,
                                                 req.num_committed_blocks)
        if out.telemetry is not None:
            owners = [RowOwner(None, False)] * out.telemetry.keys.shape[0]
            for tok in out.sampled:
                if tok.telemetry_row is not None and not tok.nonfinite:
                    live = self._live[tok.request_id]
                    owners[tok.telemetry_row] = RowOwner(live.telemetry, not live.request.internal)
            self._telemetry_rows.add(PendingStep(out.telemetry.acc, out.telemetry.keys, tuple(owners)))
        events = []
        now = time.monotonic()
        for tok in out.sampled:
            live = self._live[tok.request_id]
            if tok.nonfinite:
                log.error("request %s: non-finite logits; ending it", tok.request_id)
                events.append(self._finish(live.request, FinishReason.ERROR, error_reason="nonfinite_logits",
                                           error="the model's logits for this request were not finite (NaN or "
                                                 "inf), so no token could be drawn"))
                continue
            try:
                events.append(self._accept(live, tok, now))
            except Exception as exc:  # e.g. a detokenizer failure: this request only
                log.exception("update of %s failed", tok.request_id)
                events.append(self._finish(live.request, FinishReason.ERROR, error_reason="update_failed",
                                           error=f"the engine could not process this request's output "
                                                 f"({type(exc).__name__})"))
        return events

    def _accept(self, live: _Live, tok, now: float) -> TokenEvent:
        req = live.request
        req.token_ids.append(tok.token_id)
        counted = not req.internal
        self.generation_tokens += counted
        if req.first_token_time is None:
            req.first_token_time = now
            self.prompt_tokens += req.num_prompt_tokens * counted
            if counted:
                self._step_ttft.append(now - req.arrival_time)
        else:
            req.inter_token_latencies.append(now - req.last_token_time)
            if counted:
                self._step_itl.append(now - req.last_token_time)
        req.last_token_time = now
        logprobs = (tok.logprob,) if tok.logprob is not None else None
        update = self.output.process(req, tok.token_id)
        if update.finish_reason is None:
            return TokenEvent(req.request_id, (tok.token_id,), update.text, logprobs)
        return self._finish(req, update.finish_reason, stop_reason=update.stop_reason, token_ids=(tok.token_id,),
                            text=update.text, logprobs=logprobs)

    def _finish(self, req: Request, reason: FinishReason, *, stop_reason=None, token_ids=(), text="",
                logprobs=None, error: str | None = None, error_reason: str | None = None) -> TokenEvent:
        """End a request: free it, and build its final event. For FinishReason.ERROR, error is
        the client's message and error_reason the counted cause (ERROR_REASONS)."""
        self.scheduler.finish(req, reason)
        req.stop_reason = stop_reason
        live = self._live[req.request_id]
        if reason is FinishReason.ABORT:
            text += self.output.flush(req.request_id)
        self.output.remove(req.request_id)
        end = time.monotonic()
        stats = RequestStats(
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens, num_preemptions=req.num_preemptions,
            queue_time=(req.first_scheduled_time or end) - req.arrival_time,
            time_to_first_token=None if req.first_token_time is None else req.first_token_time - req.arrival_time,
            prefill_time=(None if req.first_token_time is None or req.first_scheduled_time is None
                          else req.first_token_time - req.first_scheduled_time),
            decode_time=(None if req.first_token_time is None else req.last_token_time - req.first_token_time),
            e2e_latency=end - req.arrival_time, inter_token_latencies=tuple(req.inter_token_latencies))
        if live.telemetry is not None:
            self._telemetry_rows.flush()                               # this request's rows are all in
        head = live.telemetry.result() if live.telemetry is not None else None
        if not req.internal:
            self._step_finished.append(FinishedRequest(req.request_id, reason, stats,
                                                       head if head and head.rows else None, error_reason))
        return TokenEvent(req.request_id, tuple(token_ids), text, logprobs, finished=True, finish_reason=reason,
                          stop_reason=stop_reason, stats=stats,
                          head_telemetry=head if req.params.head_telemetry else None, error=error)

    def _publish(self, events: list[TokenEvent]) -> list[TokenEvent]:
        """Each event into its request's stream; the step's asyncio consumers are woken together,
        once per event loop."""
        wakeups = Wakeups()
        for ev in events:
            live = self._live.get(ev.request_id)
            if live is None:
                continue
            live.stream.put(ev, wakeups)
            if ev.finished:
                with self._inbox_lock:
                    del self._live[ev.request_id]
        wakeups.flush()
        return events

    # -- consuming streams ------------------------------------------------------------------
    def _stream_of(self, request_id: str) -> RequestStream:
        with self._inbox_lock:
            stream = self._streams.get(request_id)
        if stream is None:
            raise UnknownRequestError(f"unknown request {request_id!r} (never added, or its stream was already read)")
        return stream

    def _done_reading(self, request_id: str) -> None:
        with self._inbox_lock:
            self._streams.pop(request_id, None)

    def stream(self, request_id: str) -> Iterator[TokenEvent]:
        """Yield the request's events until its final one. Every added request's stream should
        be read to its end (that releases it). Without a background loop (start() not called)
        this drives the engine's steps itself."""
        st = self._stream_of(request_id)
        while True:
            for ev in st.drain():
                yield ev
                if ev.finished:
                    self._done_reading(request_id)
                    return
            if self._thread is None:
                self.step()
            else:
                if self._dead is not None:
                    raise EngineDeadError(f"engine loop stopped: {self._dead}")
                st.wait(timeout=1.0)

    async def astream(self, request_id: str) -> AsyncIterator[TokenEvent]:
        """Async version of stream(); needs the background loop (start())."""
        if self._thread is None:
            raise RuntimeError("astream() needs the background loop: call engine.start() first")
        st = self._stream_of(request_id)
        while True:
            for ev in st.drain():
                yield ev
                if ev.finished:
                    self._done_reading(request_id)
                    return
            if self._dead is not None:
                raise EngineDeadError(f"engine loop stopped: {self._dead}")
            await st.async_wait()

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        return [self.collect(rid) for rid in ids]

    def collect(self, request_id: str) -> Completion:
        """Consume a request's stream and assemble the Completion."""
        prompt = self._stream_of(request_id).prompt_token_ids
        fold = EventFold()
        for ev in self.stream(request_id):
            fold.add(ev)
        final = fold.final
        return Completion(request_id, tuple(prompt), tuple(fold.token_ids), fold.text, final.finish_reason,
                          final.stop_reason, final.stats, final.head_telemetry,
                          tuple(fold.logprobs) if fold.logprobs else None)

    # -- background loop --------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a daemon thread until shutdown()."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="headwise-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as exc:  # noqa: BLE001 - a bug in the loop itself: fail loudly, wake everyone
            log.exception("engine loop died")
            self._dead = exc
            for live in list(self._live.values()):
                live.stream.put(TokenEvent(live.request.request_id, (), "", finished=True,
                                           finish_reason=FinishReason.ERROR, error="engine loop died"))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- observability ----------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        """False once the loop thread has died on a bug; no request can be served then."""
        return self._dead is None

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting + len(self._inbox),
            kv_cache_usage=bm.usage, num_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions, prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, steps=self.steps)

    @property
    def block_size(self) -> int:
        """Tokens per KV cache block."""
        return self.config.cache.block_size

    def head_stats_snapshot(self) -> HeadStats:
        """The server-wide per-head sums: exact once no request is running; while requests run,
        up to telemetry_buffer.FLUSH_EVERY - 1 sampled steps may still wait to be folded in."""
        return self.head_stats.snapshot()
