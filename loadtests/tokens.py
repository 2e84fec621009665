"""Counting prompt tokens, for synthetic prompts of exact lengths: with the model's own
tokenizer loaded locally (a GGUF file, a Hugging Face folder, or "default" for headwise's
default model), or by asking the server (POST /tokenize: headwise and vLLM take {"prompt"},
llama.cpp's llama-server takes {"content"})."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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


@dataclass
class ServerTokenizer:
    """POST {base_url}/tokenize; the request shape that works is remembered."""

    client: Any  # httpx.Client
    base_url: str
    _shape: str | None = field(default=None, repr=False)

    def count(self, text: str) -> int:
        shapes = [self._shape] if self._shape else ["prompt", "content"]
        last = ""
        for shape in shapes:
            body = {"prompt": text, "add_special_tokens": True} if shape == "prompt" else \
                {"content": text, "add_special": True}
            try:
                r = self.client.post(self.base_url.rstrip("/") + "/tokenize", json=body)
            except Exception as e:  # httpx.HTTPError and friends
                raise TokenizerError(f"POST /tokenize failed ({e}); pass --tokenizer PATH") from e
            if r.status_code == 200:
                data = r.json()
                self._shape = shape
                if isinstance(data.get("count"), int):
                    return data["count"]
                if isinstance(data.get("tokens"), list):
                    return len(data["tokens"])
            last = f"HTTP {r.status_code}"
        raise TokenizerError(f"the server has no usable POST /tokenize ({last}); pass --tokenizer PATH "
                             "(a .gguf file or a Hugging Face folder of the served model)")
