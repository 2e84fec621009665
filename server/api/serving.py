"""Requests -> engine requests -> responses; admission control, readiness and draining.

Everything here runs on the event loop except tokenization and chat templating, which go to a
small thread pool (a long prompt never stalls other streams). The engine runs on its own thread;
the loop only adds requests, reads their streams and aborts them.

Admission: at most `max_num_seqs + max_queue` engine requests are in flight (a request with
n choices and p prompts counts n * p). Past that, 503 with Retry-After at once, before any
tokenization and without touching the engine.

Requests the engine refuses (InvalidRequestError, from SamplingParams, chat templating or
add_request) propagate as they are: app.py answers them with errors.from_engine_error.
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

from pydantic import BaseModel, ValidationError

from server.api import streaming
from server.config import ServerConfig
from server.api.errors import APIError, bad_request, echo, from_validation_error
from server.api.schemas import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                TokenizeRequest, _SamplingFields)
from server.engine.errors import EngineDeadError
from server.engine.output import TokenEvent
from server.engine.request import FinishReason, SamplingParams

log = logging.getLogger("headwise.api")

_QUANT_SUFFIXES = (".gguf",)


class ServerState:
    """Readiness, draining and the in-flight count. Touched only from the event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0                 # engine requests admitted and not yet finished
        self.live: set[str] = set()        # their engine ids
        self.warm = False
        self.draining = False
        self.rejected: Counter[str] = Counter()
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
    read) and releases its admission slot; close() aborts whatever has not finished."""

    def __init__(self, engine, state: ServerState) -> None:
        self.engine = engine
        self.state = state
        self.queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.rids: list[str] = []
        self.finished: set[str] = set()
        self.closed = False

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
                self.queue.put_nowait((index, ev))
        except Exception as exc:  # noqa: BLE001 - EngineDeadError or a bug: end this choice with an error
            log.error("stream of %s failed: %s", rid, exc)
            self.finished.add(rid)
            self.queue.put_nowait((index, TokenEvent(rid, (), "", finished=True, finish_reason=FinishReason.ERROR,
                                                     error="the engine stopped")))
        finally:
            self.state.live.discard(rid)
            self.state.release(1)

    async def next_batch(self) -> list[tuple[int, TokenEvent]]:
        """Every queued event, waiting for at least one."""
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

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


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None


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
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="headwise-tokenize")
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
        if self.state.draining:
            self.state.rejected["draining"] += 1
            raise APIError(503, "the server is shutting down", type="service_unavailable_error",
                           code="server_shutting_down", headers={"retry-after": str(self.cfg.retry_after_s)})

    def admit(self, k: int) -> None:
        self.check_serving()
        if k > self.state.capacity:
            raise bad_request(f"this request needs {k} sequences; the server runs at most {self.state.capacity} "
                              f"at once", param="n")
        if not self.state.try_admit(k):
            self.state.rejected["queue_full"] += 1
            raise APIError(503, "the server is overloaded (the request queue is full); retry later",
                           type="service_unavailable_error", code="server_is_overloaded",
                           headers={"retry-after": str(self.cfg.retry_after_s)})

    async def off_loop(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    def sampling_params(self, req: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                        seed: int | None) -> SamplingParams:
        """The engine's parameters for a request; SamplingParams raises InvalidRequestError on bad values."""
        stop = req.stop
        stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
        kw = dict(max_tokens=max_tokens, seed=seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                  logprobs=logprobs, ignore_eos=bool(req.ignore_eos),
                  include_stop_str_in_output=bool(req.include_stop_str_in_output),
                  skip_special_tokens=req.skip_special_tokens is not False, head_telemetry=bool(req.head_telemetry))
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
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        return n

    @staticmethod
    def choice_seed(seed: int | None, i: int) -> int | None:
        """Choice i's seed: the request's for choice 0, then seed + i (distinct, reproducible)."""
        return None if seed is None else seed + i

    # -- completions --------------------------------------------------------------------------
    async def completions(self, body: bytes, receive) -> tuple[str, Any, dict]:
        req: CompletionRequest = _parse(CompletionRequest, body)
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

    def _prompt_list(self, prompt) -> list[str | list[int]]:
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > self.cfg.max_prompts:
            raise bad_request(f"at most {self.cfg.max_prompts} prompts per request, got {len(prompts)}",
                              param="prompt")
        for i, p in enumerate(prompts):
            if (isinstance(p, str) and not p) or (isinstance(p, list) and not p):
                raise bad_request("prompt must not be empty", param="prompt" if len(prompts) == 1 else f"prompt[{i}]")
        vocab = self.engine.model_config.vocab_size
        for p in prompts:
            if isinstance(p, list) and any(t >= vocab for t in p):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompts

    # -- chat ---------------------------------------------------------------------------------
    def chat_messages(self, messages: Sequence[ChatMessage]) -> list[dict]:
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
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, body)
        n = self.common_checks(req)
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request(f"response_format {req.response_format.type!r} is not supported",
                              param="response_format", code="unsupported_parameter")
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
        """Admit, tokenize off the loop, add to the engine; return ("stream", (iterator, generation),
        headers) or ("json", body, headers)."""
        num_prompts = 1 if prompts is None else len(prompts)
        total = num_prompts * n
        self.admit(total)
        added = 0
        gen = Generation(self.engine, self.state)
        try:
            if render is not None:
                ids_list = [await self.render_chat(*render)]
            else:
                ids_list = await self.off_loop(
                    lambda: [self.engine.tokenize(p) if isinstance(p, str) else list(p) for p in prompts])
            echo_texts = None
            if echo:
                texts = await self.off_loop(lambda: [p if isinstance(p, str) else self.engine.tokenizer.decode(p)
                                                     for p in prompts])
                echo_texts = [t for t in texts for _ in range(n)]
            self.check_serving()
            choices = []
            for p, ids in enumerate(ids_list):
                for i in range(n):
                    index = p * n + i
                    params = base if req.seed is None else _with_seed(base, self.choice_seed(req.seed, i))
                    gen.add(index, ids, params)
                    added += 1
                    choices.append(streaming.ChoiceState(index=index))
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
        body, t = streaming.response_body(fmt, rid=rid, created=created, model=self.model_id, choices=choices,
                                          prompt_lengths=prompt_lengths, want_telemetry=want_telemetry)
        return "json", body, streaming.timing_headers(t)

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
        req: TokenizeRequest = _parse(TokenizeRequest, body)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
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
        req: DetokenizeRequest = _parse(DetokenizeRequest, body)
        self.check_model(req.model)
        vocab = self.engine.model_config.vocab_size
        if any(t >= vocab for t in req.tokens):
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
        """Refuse new work, let in-flight requests finish for up to `timeout` s, then abort the rest."""
        self.state.draining = True
        log.warning("draining: %d engine requests in flight, up to %.1f s", self.state.in_flight, timeout)
        if not await self.state.wait_idle(timeout):
            log.warning("drain timeout: aborting %d engine requests", len(self.state.live))
            for rid in list(self.state.live):
                self.engine.abort(rid)
            await self.state.wait_idle(grace)

    def close(self) -> None:
        for rid in list(self.state.live):
            self.engine.abort(rid)
        self.pool.shutdown(wait=False, cancel_futures=True)


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)
