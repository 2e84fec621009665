"""Counting prompt tokens, for synthetic prompts of exact lengths: with the model's own
tokenizer loaded locally (a GGUF file, a Hugging Face folder, or "default" for headwise's
default model), or by asking the server in its own dialect of POST /tokenize:

    headwise      {"prompt", "add_special_tokens"[, "model"]}  -> {"count", "tokens", ...}
    vllm          {"prompt", "add_special_tokens"[, "model"]}  -> {"count", "tokens", ...}
    llamacpp      {"content", "add_special"}                   -> {"tokens": [...]}

A server of unknown kind gets the vLLM form, then llama-server's. An answer is used only if it
carries a token list or count and counts a non-empty text as at least one token: llama-server
answers the vLLM form with 200 and an empty list, which once made every prompt "0 tokens long".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol


class TokenCounter(Protocol):
    def count(self, text: str) -> int: ...


class TokenizerError(RuntimeError):
    """No usable tokenizer: the message says what to pass instead."""


@dataclass
class LocalTokenizer:
    """A transformers tokenizer; counts include the special tokens a plain prompt gets (BOS)."""

    tokenizer: Any

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True))


def load_local(spec: str) -> LocalTokenizer:
    """spec: "default" (headwise's default model), a .gguf file, or a Hugging Face folder."""
    if spec == "default":
        from server.engine.loader import default_model_path

        spec = default_model_path()
    if os.path.isfile(spec):
        from server.engine.gguf_convert import build_tokenizer  # the tokenizer headwise builds from a GGUF

        try:
            return LocalTokenizer(build_tokenizer(spec))
        except Exception as e:  # the loader's errors carry a readable message
            raise TokenizerError(f"cannot build a tokenizer from {spec}: {e}") from e
    if os.path.isdir(spec):
        from transformers import AutoTokenizer

        try:
            return LocalTokenizer(AutoTokenizer.from_pretrained(spec, local_files_only=True))
        except Exception as e:
            raise TokenizerError(f"cannot load a tokenizer from {spec}: {type(e).__name__}: {e}") from e
    raise TokenizerError(f"--tokenizer {spec!r}: no such file or folder (give a .gguf file, a Hugging Face "
                         "folder, 'default' or 'server')")


DIALECTS = ("prompt", "content")  # the request shapes: vLLM's and headwise's, llama-server's
KIND_DIALECTS = {"headwise": ("prompt", "content"), "vllm": ("prompt", "content"),
                 "llamacpp": ("content", "prompt"), "openai": ("prompt", "content")}
FLAG_HINT = ("pass --tokenizer PATH (a .gguf file or a Hugging Face folder of the served model, or "
             "'default' for headwise's default model)")


def tokenize_body(dialect: str, text: str, model: str | None) -> dict[str, Any]:
    if dialect == "content":  # llama.cpp's llama-server
        return {"content": text, "add_special": True}
    body: dict[str, Any] = {"prompt": text, "add_special_tokens": True}
    if model is not None:
        body["model"] = model  # vLLM checks it against the served names; headwise accepts it
    return body


def answer_count(data: Any) -> int | None:
    """The token count of a /tokenize answer, or None when it is not one."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("count"), int) and not isinstance(data["count"], bool):
        return data["count"]
    if isinstance(data.get("tokens"), list):
        return len(data["tokens"])  # llama-server: ids, or {"id", "piece"} objects with with_pieces
    return None


@dataclass
class ServerTokenizer:
    """POST {base_url}/tokenize in the dialect of the server's kind (target.KINDS); the first
    dialect that gives a plausible answer is kept for every later count."""

    client: Any  # httpx.Client
    base_url: str
    kind: str = "openai"
    model: str | None = None
    dialect: str | None = None

    def count(self, text: str) -> int:
        if self.dialect is not None:
            n, why = self._ask(self.dialect, text)
            if n is None:
                raise TokenizerError(f"POST /tokenize stopped answering ({why}); {FLAG_HINT}")
            return n
        tried = []
        for dialect in KIND_DIALECTS.get(self.kind, DIALECTS):
            n, why = self._ask(dialect, text)
            if n is not None and (n > 0 or not text):
                self.dialect = dialect
                return n
            tried.append(f"{{{dialect!r}: ...}}: {why or 'counted a non-empty text as 0 tokens'}")
        raise TokenizerError(f"the {self.kind} server at {self.base_url} has no usable POST /tokenize "
                             f"({'; '.join(tried)}); {FLAG_HINT}")

    def _ask(self, dialect: str, text: str) -> tuple[int | None, str | None]:
        try:
            r = self.client.post(self.base_url.rstrip("/") + "/tokenize", json=tokenize_body(dialect, text, self.model))
        except Exception as e:  # httpx.HTTPError and friends
            return None, f"{type(e).__name__}: {e}"
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}"
        try:
            n = answer_count(r.json())
        except ValueError:
            return None, "the answer is not JSON"
        return n, None if n is not None else "no token list or count in the answer"


def server_or_model_tokenizer(client: Any, base_url: str, kind: str, model: str | None) -> TokenCounter:
    """The server's /tokenize (checked once on a short text); when it has none, the served
    model's own tokenizer if the model id names a local file or folder (vLLM serves a folder path
    under its path unless --served-model-name); else a TokenizerError that names the flag."""
    server = ServerTokenizer(client, base_url, kind=kind, model=model)
    try:
        server.count("Hello world")
        return server
    except TokenizerError as e:
        if model and (os.path.isfile(model) or os.path.isdir(model)):
            return load_local(model)
        raise e
