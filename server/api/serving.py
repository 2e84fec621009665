"""Requests -> engine requests -> responses; admission control, readiness and draining.

The event loop only does work whose size is bounded by the server's limits, not by the client:
- tokenization and chat templating run in a small thread pool, and a text that could not fit
  the context window whatever its tokens (more characters than max_model_len times the longest
  token) is refused before it is tokenized;
- bodies over INLINE_BODY_BYTES are parsed, and responses over INLINE_RESPONSE_ITEMS tokens and
  logprobs built and encoded, in a second pool (bulk work never queues ahead of tokenization);
  the encoding is done in short pieces (streaming.encode), since a thread that holds the GIL
  for long stalls the loop as surely as the loop itself;
- a token-id prompt's length is checked before its ids are scanned against the vocabulary;
- a stream turns at most STREAM_BATCH_EVENTS queued events into SSE per wake-up.
Small requests never pay for a thread hop. The engine runs on its own thread; the loop only
adds requests, reads their streams and aborts them.

Admission: one request may ask for at most max_request_seqs sequences (n x prompts; 400 above),
and at most `max_num_seqs + max_queue` engine requests are in flight. Past that, 503 with
Retry-After at once, before any tokenization and without touching the engine. Once admitted, a
request is served even if SIGTERM arrives while it is tokenized (draining waits for it); only
when the drain timeout has passed are requests not yet in the engine refused.

Backpressure: a streaming request buffers at most stream_buffer_events events for its client;
a client that stops reading past that gets its engine requests aborted (their KV blocks are
freed), the stall counted as rejected reason "slow_consumer", and its stream ends with an error
event once the client reads again.

Requests the engine refuses (InvalidRequestError, from SamplingParams, chat templating or
add_request) propagate as they are: app.py answers them with errors.from_engine_error.

Structured output: a request's output constraint (structured.grammar_spec) is compiled off the
loop, into the engine's grammar cache, before the request is added (a first compile also builds
llguidance's view of the vocabulary); a grammar that does not compile is refused then, before
anything is scheduled. Admitted constrained requests are counted by kind (ServerState.structured).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from server.api import streaming
from server.config import ServerConfig
from server.api.errors import APIError, bad_request, echo, from_validation_error
from server.api.schemas import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                TokenizeRequest, _SamplingFields)
from server.api.structured import grammar_spec
from server.engine.errors import EngineDeadError
from server.engine.output import TokenEvent
from server.engine.request import FinishReason, SamplingParams

log = logging.getLogger("headwise.api")

_QUANT_SUFFIXES = (".gguf",)
INLINE_BODY_BYTES = 64 * 1024    # bodies up to this are parsed on the loop (about 1 ms at most)
INLINE_RESPONSE_ITEMS = 2048     # responses with up to this many tokens and logprobs are built on the loop
STREAM_BATCH_EVENTS = 64         # queued events one stream turns into SSE per wake-up


class ServerState:
    """Readiness, draining and the in-flight count. Touched only from the event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0                 # engine requests admitted and not yet finished
        self.live: set[str] = set()        # their engine ids
        self.warm = False
        self.draining = False              # SIGTERM: new requests are refused
        self.stopping = False              # the drain timed out: admitted requests not yet in the engine are too
        self.rejected: Counter[str] = Counter()
        self.structured: Counter[str] = Counter()  # admitted requests with an output constraint, by kind
        self.tasks: set[asyncio.Task] = set()
        self._idle: asyncio.Event | None = None

    @property
    def ready(self) -> bool:
        return self.warm and not self.draining

    def try_admit(self, k: int) -> bool:
        if self.in_flight + k > self.capacity:
            return False
        self.in_flight += k
        return True

    def release(self, k: int) -> None:
        self.in_flight -= k
        if self.in_flight <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        if self.in_flight <= 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class Generation:
    """The engine requests behind one HTTP request, their events merged into one queue.

    A pump task per engine request reads its stream to the end (the engine needs every stream
    read) and releases its admission slot; close() aborts whatever has not finished. With
    `max_buffered`, more than that many events waiting for the reader means the reader stalled:
    the buffer is dropped, every engine request aborted, the stall counted (slow_consumer), and
    the reader's next next_batch() raises streaming.SlowConsumer."""

    def __init__(self, engine, state: ServerState, max_buffered: int | None = None) -> None:
        self.engine = engine
        self.state = state
        self.max_buffered = max_buffered
        # events; None marks the end of a stalled reader's stream
        self.queue: asyncio.Queue[tuple[int, TokenEvent] | None] = asyncio.Queue()
        self.rids: list[str] = []
        self.finished: set[str] = set()
        self.closed = False
        self.stalled = False

    def add(self, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        rid = self.engine.add_request(prompt_ids, params)
        self.rids.append(rid)
        self.state.live.add(rid)
        self.state.spawn(self._pump(index, rid))

    async def _pump(self, index: int, rid: str) -> None:
        try:
            async for ev in self.engine.astream(rid):
                if ev.finished:
                    self.finished.add(rid)
                self._put((index, ev))
        except Exception as exc:  # noqa: BLE001 - EngineDeadError or a bug: end this choice with an error
            log.error("stream of %s failed: %s", rid, exc)
            self.finished.add(rid)
            self._put((index, TokenEvent(rid, (), "", finished=True, finish_reason=FinishReason.ERROR,
                                         error="the engine stopped")))
        finally:
            self.state.live.discard(rid)
            self.state.release(1)

    def _put(self, item: tuple[int, TokenEvent]) -> None:
        if self.stalled:
            return  # the reader is gone for good: what is left of the streams is dropped
        self.queue.put_nowait(item)
        if self.max_buffered is not None and self.queue.qsize() > self.max_buffered:
            self._stall()

    def _stall(self) -> None:
        """The reader left more than max_buffered events unread: free everything it holds."""
        self.stalled = True
        self.state.rejected["slow_consumer"] += 1
        log.warning("a stream's client stopped reading (%d events unread): aborting %s", self.queue.qsize(),
                    ", ".join(self.rids))
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)
        self.close()

    async def next_batch(self, limit: int = STREAM_BATCH_EVENTS) -> list[tuple[int, TokenEvent]]:
        """Up to `limit` queued events, waiting for at least one. When more are queued, the loop
        first runs other work (a backlog is consumed a slice per loop iteration). Raises
        streaming.SlowConsumer once the reader has stalled."""
        if self.queue.qsize() > limit:
            await asyncio.sleep(0)
        batch = []
        item = await self.queue.get()
        while item is not None:
            batch.append(item)
            if len(batch) >= limit or self.queue.empty():
                return batch
            item = self.queue.get_nowait()
        raise streaming.SlowConsumer(f"the client stopped reading its stream; more than {self.max_buffered} "
                                     "events were waiting, so the request was stopped")

    def close(self) -> None:
        """Abort the engine requests that have not finished (client gone, error, shutdown)."""
        if self.closed:
            return
        self.closed = True
        for rid in self.rids:
            if rid not in self.finished:
                self.engine.abort(rid)


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def parse_body(model: type[BaseModel], body: bytes, check_raw: Callable[[Any], None] | None = None) -> Any:
    """The request `model` a JSON body holds, or the 400 that refuses it.

    Parsed in two steps, JSON first and then the model: the errors are those of
    model_validate_json, but a too-long array is refused before its elements are validated, and
    `check_raw` (sizes, which raises APIError) sees the parsed JSON before the model does."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    try:
        value = pydantic_core.from_json(body, allow_inf_nan=True)  # NaN is refused by the model, naming its field
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if check_raw is not None:
        check_raw(value)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _split_prompts(prompt: str | list) -> list:
    """A completions prompt as a list of prompts: one text, one list of token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and not isinstance(prompt[0], (str, list))):
        return [prompt]
    return list(prompt)


def max_chars_per_token(tokenizer) -> int:
    """How many characters of text one token can stand for, at most: the longest vocabulary
    entry (byte-level BPE entries have one character per byte, never fewer than the text's
    characters), four times that when a normalizer runs first (NFC and the like compose a few
    characters into one). A text longer than max_model_len times this cannot fit the context."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalized = backend is None or backend.normalizer is not None
    return longest * (4 if normalized else 1)


_CHAT_KWARGS_DENY = {"self", "conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                     "add_generation_prompt", "continue_final_message", "padding", "truncation", "max_length",
                     "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "kwargs"}


class OpenAIServing:
    """The logic behind the routes (app.py stays thin)."""

    def __init__(self, engine, cfg: ServerConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        max_num_seqs = engine.config.scheduler.max_num_seqs
        self.state = ServerState(capacity=max_num_seqs + cfg.max_queue)
        self.max_request_seqs = min(cfg.max_request_seqs or max(1, max_num_seqs // 2), self.state.capacity)
        self.max_prompt_chars = engine.max_model_len * max_chars_per_token(engine.tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="headwise-tokenize")
        # one worker: at most one long parse or render holds the GIL at a time, between the loop's turns
        self.bulk_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headwise-bulk")
        self.token_str = streaming.TokenStrings(engine.tokenizer)
        self.created = int(time.time())
        name = engine.model_config.name
        self.model_id = cfg.served_model_names[0] if cfg.served_model_names else name
        self.aliases = self._aliases(name)
        try:
            params = inspect.signature(engine.tokenizer.apply_chat_template).parameters
            self.chat_kwargs_deny = _CHAT_KWARGS_DENY | set(params)
        except (TypeError, ValueError):
            self.chat_kwargs_deny = set(_CHAT_KWARGS_DENY)

    def _aliases(self, name: str) -> set[str]:
        names = {self.model_id, name, *self.cfg.served_model_names}
        source = getattr(getattr(self.engine, "loaded", None), "source", None) or self.engine.config.model
        if source:
            names |= {source, os.path.basename(source.rstrip("/"))}
            if self.engine.config.model:
                names.add(self.engine.config.model)
        for n in list(names):
            for suffix in _QUANT_SUFFIXES:
                if n.lower().endswith(suffix):
                    names.add(n[: -len(suffix)])
            stem, dot, quant = n.rpartition(".")
            if dot and quant[:1] in ("Q", "q", "F", "f") and any(ch.isdigit() for ch in quant):
                names.add(stem)  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
        return {n.lower() for n in names if n}

    # -- helpers ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is None or model.lower() in self.aliases:
            return
        raise APIError(404, f"The model {echo(model)} does not exist; this server serves {echo(self.model_id)}",
                       param="model", code="model_not_found")

    def check_serving(self) -> None:
        """503 for a new request once SIGTERM has come."""
        if self.state.draining:
            raise self._shutting_down()

    def check_stopping(self) -> None:
        """503 for an admitted request not yet in the engine once the drain has timed out."""
        if self.state.stopping:
            raise self._shutting_down()

    def _shutting_down(self) -> APIError:
        self.state.rejected["draining"] += 1
        return APIError(503, "the server is shutting down", type="service_unavailable_error",
                        code="server_shutting_down", headers={"retry-after": str(self.cfg.retry_after_s)})

    def check_sequences(self, n: int, num_prompts: int) -> None:
        """400 for a request asking for more sequences than one request may have."""
        total = n * num_prompts
        if total > self.max_request_seqs:
            raise bad_request(f"this request asks for {total} sequences (n={n} x {num_prompts} prompts); one request "
                              f"may have at most {self.max_request_seqs} on this server",
                              param="n" if n > 1 or num_prompts == 1 else "prompt")

    def check_text_fits(self, chars: int, param: str) -> None:
        """context_length_exceeded, before tokenizing, for a text too long to fit whatever its tokens."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt is {chars} characters long; the context window of "
                                f"{self.engine.max_model_len} tokens holds at most {self.max_prompt_chars} "
                                "characters of it", param=param, code="context_length_exceeded")

    def check_ids_fit(self, num_ids: int, param: str) -> None:
        """context_length_exceeded for a token-id prompt that leaves no room to generate."""
        if num_ids >= self.engine.max_model_len:
            raise APIError(400, f"prompt has {num_ids} tokens; the context window is {self.engine.max_model_len} "
                                "tokens and at least one must be left to generate", param=param,
                           code="context_length_exceeded")

    def admit(self, k: int) -> None:
        self.check_serving()
        if not self.state.try_admit(k):
            self.state.rejected["queue_full"] += 1
            raise APIError(503, "the server is overloaded (the request queue is full); retry later",
                           type="service_unavailable_error", code="server_is_overloaded",
                           headers={"retry-after": str(self.cfg.retry_after_s)})

    async def off_loop(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in the tokenizer pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def in_bulk_pool(self, fn, *args):
        """fn(*args) in the pool for large bodies and responses."""
        return await asyncio.get_running_loop().run_in_executor(self.bulk_pool, fn, *args)

    async def parse(self, model: type[BaseModel], body: bytes, check_raw: Callable[[Any], None] | None = None) -> Any:
        """parse_body, in the bulk pool when the body is large."""
        if len(body) <= INLINE_BODY_BYTES:
            return parse_body(model, body, check_raw)
        return await self.in_bulk_pool(parse_body, model, body, check_raw)

    def sampling_params(self, req: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                        seed: int | None) -> SamplingParams:
        """The engine's parameters for a request; SamplingParams raises InvalidRequestError on bad values,
        grammar_spec a 400 for more than one output constraint."""
        stop = req.stop
        stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
        kw = dict(max_tokens=max_tokens, seed=seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                  logprobs=logprobs, ignore_eos=bool(req.ignore_eos),
                  include_stop_str_in_output=bool(req.include_stop_str_in_output),
                  skip_special_tokens=req.skip_special_tokens is not False, head_telemetry=bool(req.head_telemetry),
                  logit_bias=req.logit_bias or (), grammar=grammar_spec(req))
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "min_tokens"):
            value = getattr(req, name)
            if value is not None:
                kw[name] = value
        return SamplingParams(**kw)

    def common_checks(self, req: _SamplingFields) -> int:
        self.check_model(req.model)
        n = req.n or 1
        if n > self.cfg.max_n:
            raise bad_request(f"n must be at most {self.cfg.max_n}, got {n}", param="n")
        vocab = self.engine.model_config.vocab_size
        if req.stop_token_ids and max(req.stop_token_ids) >= vocab:
            raise bad_request(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if req.logit_bias and req.logit_bias[-1][0] >= vocab:  # sorted pairs: the largest id is the last
            raise bad_request(f"logit_bias token ids must be in [0, {vocab}), got {req.logit_bias[-1][0]}",
                              param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        return n

    @staticmethod
    def choice_seed(seed: int | None, i: int) -> int | None:
        """Choice i's seed: the request's for choice 0, then seed + i (distinct, reproducible)."""
        return None if seed is None else seed + i

    # -- completions --------------------------------------------------------------------------
    async def completions(self, body: bytes, receive) -> tuple[str, Any, dict]:
        req: CompletionRequest = await self.parse(CompletionRequest, body, check_raw=self.check_prompt_sizes)
        n = self.common_checks(req)
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != n:
            raise bad_request("best_of must equal n (or be omitted)", param="best_of", code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported", param="echo",
                              code="unsupported_parameter")
        prompts = self._prompt_list(req.prompt)
        base = self.sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs, seed=None)
        return await self._run(kind="completion", prompts=prompts, n=n, req=req, base=base,
                               fmt_factory=lambda echo_texts: streaming.CompletionFormat(self.token_str, req.logprobs,
                                                                                          echo_texts),
                               echo=bool(req.echo), receive=receive)

    def check_prompt_sizes(self, body: Any) -> None:
        """The completions prompt's sizes, checked on the raw JSON before it is validated, so that a
        prompt of a million token ids is refused without a million ids being validated: at most
        max_prompts prompts, texts that could fit (check_text_fits), token ids that leave room to
        generate (check_ids_fit). Everything else about the prompt is left to the schema and to
        _prompt_list."""
        raw = body.get("prompt") if isinstance(body, dict) else None
        prompts = _split_prompts(raw) if isinstance(raw, (str, list)) else []
        if len(prompts) > self.cfg.max_prompts:
            raise bad_request(f"at most {self.cfg.max_prompts} prompts per request, got {len(prompts)}",
                              param="prompt")
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                self.check_text_fits(len(p), param)
            elif isinstance(p, list):
                self.check_ids_fit(len(p), param)

    def _prompt_list(self, prompt) -> list[str | list[int]]:
        """The validated prompt as a list of prompts (their sizes were checked by
        check_prompt_sizes, which bounds the vocabulary scan here by the context window)."""
        prompts = _split_prompts(prompt)
        if not prompts:
            raise bad_request("prompt must not be empty", param="prompt")
        vocab = self.engine.model_config.vocab_size
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not p:
                raise bad_request("prompt must not be empty", param=param)
            if isinstance(p, list) and max(p) >= vocab:
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param=param)
        return prompts

    # -- chat ---------------------------------------------------------------------------------
    def chat_messages(self, messages: Sequence[ChatMessage]) -> list[dict]:
        """The template's messages; context_length_exceeded (before templating) when their text
        alone could not fit the context window."""
        out = []
        for i, m in enumerate(messages):
            if m.role in ("tool", "function") or m.tool_calls:
                raise bad_request("tool and function messages are not supported", param=f"messages[{i}].role",
                                  code="unsupported_parameter")
            content = m.content
            if content is None:
                if m.role != "assistant":
                    raise bad_request(f"messages[{i}].content is required for role {m.role!r}",
                                      param=f"messages[{i}].content")
                content = ""
            elif not isinstance(content, str):
                content = "\n".join(part.text for part in content)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        self.check_text_fits(sum(len(m["content"]) for m in out), "messages")
        return out

    def chat_kwargs(self, kwargs: dict | None) -> dict:
        kwargs = dict(kwargs or {})
        for key in kwargs:
            if key in self.chat_kwargs_deny or not key.isidentifier() or key.startswith("_"):
                raise bad_request(f"chat_template_kwargs may not set {echo(key)}", param="chat_template_kwargs")
        return kwargs

    async def render_chat(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> list[int]:
        """The prompt ids of a conversation, templated off the loop (InvalidRequestError when it cannot be)."""
        return await self.off_loop(self.engine.chat_prompt, messages, add_generation_prompt=add_generation_prompt,
                                   **kwargs)

    async def chat(self, body: bytes, receive) -> tuple[str, Any, dict]:
        req: ChatCompletionRequest = await self.parse(ChatCompletionRequest, body)
        n = self.common_checks(req)
        if req.tools and req.tool_choice != "none":
            raise bad_request("tools are not supported", param="tools", code="unsupported_parameter")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = self.chat_messages(req.messages)
        kwargs = self.chat_kwargs(req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = req.top_logprobs or 0
        base = self.sampling_params(req, max_tokens=max_tokens, logprobs=top if req.logprobs else None, seed=None)
        render = (messages, req.add_generation_prompt is not False, kwargs)
        return await self._run(kind="chat", prompts=None, render=render, n=n, req=req, base=base,
                               fmt_factory=lambda _: streaming.ChatFormat(self.token_str, bool(req.logprobs), top),
                               echo=False, receive=receive)

    # -- shared run -----------------------------------------------------------------------------
    async def _run(self, *, kind: str, prompts, n: int, req, base: SamplingParams, fmt_factory, echo: bool,
                   receive, render=None) -> tuple[str, Any, dict]:
        """Check the sequence cap, admit, tokenize and compile the grammar off the loop, add to the
        engine; return ("stream", (iterator, generation), headers) or ("json", body bytes, headers).

        Once admitted, a request is not refused for draining (drain waits for it), only for a
        drain that has timed out (check_stopping)."""
        num_prompts = 1 if prompts is None else len(prompts)
        self.check_sequences(n, num_prompts)
        total = num_prompts * n
        self.admit(total)
        added = 0
        gen = Generation(self.engine, self.state, self.cfg.stream_buffer_events if req.stream else None)
        try:
            if render is not None:
                ids_list = [await self.render_chat(*render)]
            elif all(isinstance(p, list) for p in prompts):
                ids_list = prompts  # token ids, checked in _prompt_list: nothing to do off the loop
            else:
                ids_list = await self.off_loop(self._prompt_ids, prompts)
            echo_texts = None
            if echo:
                texts = await self.off_loop(lambda: [p if isinstance(p, str) else self.engine.tokenizer.decode(p)
                                                     for p in prompts])
                echo_texts = [t for t in texts for _ in range(n)]
            if base.grammar is not None:
                await self.off_loop(self.engine.compile_grammar, base.grammar)
            self.check_stopping()
            choices = []
            for p, ids in enumerate(ids_list):
                for i in range(n):
                    index = p * n + i
                    params = base if req.seed is None else _with_seed(base, self.choice_seed(req.seed, i))
                    gen.add(index, ids, params)
                    added += 1
                    choices.append(streaming.ChoiceState(index=index))
            if base.grammar is not None:
                self.state.structured[base.grammar.kind] += 1
        except EngineDeadError:
            gen.close()
            raise APIError(503, "the engine is not running", type="service_unavailable_error",
                           code="engine_dead") from None
        except BaseException:
            gen.close()
            raise
        finally:
            self.state.release(total - added)  # slots never handed to a pump
        fmt = fmt_factory(echo_texts)
        fmt.return_token_ids = bool(req.return_token_ids)
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        created = int(time.time())
        prompt_lengths = [len(ids) for ids in ids_list]
        want_telemetry = bool(req.head_telemetry)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            it = streaming.sse_events(fmt, gen, rid=rid, created=created, model=self.model_id, choices=choices,
                                      prompt_lengths=prompt_lengths, include_usage=include_usage,
                                      want_telemetry=want_telemetry)
            return "stream", (it, gen), {}
        await self._collect(gen, choices, receive)
        errors = [c.final.error for c in choices if c.final is not None and c.final.finish_reason is FinishReason.ERROR]
        if errors:
            raise APIError(500, f"generation failed: {errors[0] or 'engine error'}", type="server_error",
                           code="generation_failed")
        render_args = (fmt, rid, created, choices, prompt_lengths, want_telemetry)
        if streaming.response_size(choices) <= INLINE_RESPONSE_ITEMS:
            body, t = self._render(*render_args)
        else:
            body, t = await self.in_bulk_pool(self._render, *render_args)
        return "json", body, streaming.timing_headers(t)

    def _prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Every prompt's token ids (text is tokenized: call off the loop)."""
        return [self.engine.tokenize(p) if isinstance(p, str) else p for p in prompts]

    def _render(self, fmt, rid: str, created: int, choices: list[streaming.ChoiceState], prompt_lengths: list[int],
                want_telemetry: bool) -> tuple[bytes, dict | None]:
        """The encoded non-streaming response and its timings."""
        return streaming.response_bytes(fmt, rid=rid, created=created, model=self.model_id, choices=choices,
                                        prompt_lengths=prompt_lengths, want_telemetry=want_telemetry)

    async def _collect(self, gen: Generation, choices: list[streaming.ChoiceState], receive) -> None:
        """Read every choice to its end; a client that goes away aborts the generation."""
        async def work() -> None:
            remaining = len(choices)
            while remaining:
                batch = await gen.next_batch()
                for index, ev in batch:
                    choices[index].add(ev)
                    if ev.finished:
                        remaining -= 1
                        if ev.finish_reason is FinishReason.ERROR:
                            return

        task = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                raise ClientDisconnected()
            task.result()
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            gen.close()

    # -- models, tokenizer ----------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "headwise", "root": self.engine.model_config.name,
                                            "max_model_len": self.engine.max_model_len}]}

    async def tokenize(self, body: bytes) -> dict:
        """Token ids of a prompt or conversation; one that could not fit the context window is
        refused (context_length_exceeded) before it is tokenized, as for generation."""
        req: TokenizeRequest = await self.parse(TokenizeRequest, body)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            self.check_text_fits(len(req.prompt), "prompt")
        if req.messages is not None:
            ids = await self.render_chat(self.chat_messages(req.messages), req.add_generation_prompt is not False,
                                         self.chat_kwargs(req.chat_template_kwargs))
        else:
            tok = self.engine.tokenizer
            ids = await self.off_loop(lambda: list(tok.encode(req.prompt, add_special_tokens=req.add_special_tokens
                                                              is not False)))
        out = {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = await self.off_loop(lambda: self.engine.tokenizer.convert_ids_to_tokens(ids))
        return out

    async def detokenize(self, body: bytes) -> dict:
        req: DetokenizeRequest = await self.parse(DetokenizeRequest, body)
        self.check_model(req.model)
        vocab = self.engine.model_config.vocab_size
        if req.tokens and max(req.tokens) >= vocab:
            raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
        text = await self.off_loop(lambda: self.engine.tokenizer.decode(req.tokens))
        return {"prompt": text}

    # -- lifecycle ------------------------------------------------------------------------------
    async def warmup(self) -> None:
        """A 2-token greedy request through the whole path; /ready turns 200 after it."""
        if self.cfg.warmup:
            ids = await self.off_loop(self.engine.tokenize, "Hello") or [0]
            rid = self.engine.add_request(ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                          internal=True)
            async for _ in self.engine.astream(rid):
                pass
        self.state.warm = True

    async def drain(self, timeout: float, grace: float = 5.0) -> None:
        """Refuse new work, let in-flight requests (admitted ones still being tokenized included)
        finish for up to `timeout` s, then refuse those not yet in the engine and abort the rest."""
        self.state.draining = True
        log.warning("draining: %d engine requests in flight, up to %.1f s", self.state.in_flight, timeout)
        if not await self.state.wait_idle(timeout):
            self.state.stopping = True
            log.warning("drain timeout: aborting %d engine requests", len(self.state.live))
            for rid in list(self.state.live):
                self.engine.abort(rid)
            await self.state.wait_idle(grace)

    def close(self) -> None:
        self.state.stopping = True
        for rid in list(self.state.live):
            self.engine.abort(rid)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.bulk_pool.shutdown(wait=False, cancel_futures=True)


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)
