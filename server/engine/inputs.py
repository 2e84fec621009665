"""Prompts in: text or token ids or chat messages -> validated token ids and a token budget.

Runs on the caller's thread, before anything reaches the engine loop (grammars are compiled
here too), and raises
InvalidRequestError / ContextLengthExceededError (HTTP 400) for input the model cannot take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.errors import ContextLengthExceededError, InvalidRequestError
from server.engine.request import SamplingParams
from server.engine.structured import GrammarCompiler


@dataclass(frozen=True)
class PreparedPrompt:
    token_ids: list[int]
    max_tokens: int  # output tokens allowed: params.max_tokens, or the rest of the context window
    grammar: object | None = None  # a fresh grammar matcher, when params.grammar


class InputProcessor:
    """The tokenizer and the chat template of one model, and the limits of its context window."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.grammars = GrammarCompiler(tokenizer, vocab_size)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Token ids of messages rendered through the model's chat template."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use a plain prompt", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **template_kwargs)
        except Exception as exc:  # jinja errors, bad roles: the client's input
            raise InvalidRequestError(f"chat template failed: {exc}", param="messages") from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prepare(self, prompt: str | Sequence[int], params: SamplingParams) -> PreparedPrompt:
        """Token ids of prompt (tokenized when text, checked against the vocabulary when ids) and
        the output budget, or the error that refuses the request."""
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = list(prompt)
            vocab = self.vocab_size
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if not ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        for name, listed in (("stop_token_ids", params.stop_token_ids),
                             ("logit_bias", [t for t, _ in params.logit_bias])):
            outside = [t for t in listed if t >= self.vocab_size]
            if outside:
                raise InvalidRequestError(f"{name}: token ids must be in [0, {self.vocab_size}), got {outside[0]}",
                                          param=name)
        if len(ids) >= self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt has {len(ids)} tokens; the context window is {self.max_model_len} tokens "
                f"and at least one must be left to generate", param="prompt")
        if params.max_tokens is None:
            max_tokens = self.max_model_len - len(ids)
        elif len(ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the context window "
                f"of {self.max_model_len} tokens", param="max_tokens")
        else:
            max_tokens = params.max_tokens
        grammar = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        return PreparedPrompt(ids, max_tokens, grammar)
