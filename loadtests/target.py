"""The server under test: where to send, what kind it is, and the request body it gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtests.records import Prompt

KINDS = ("headwise", "llamacpp", "vllm", "openai")


@dataclass(frozen=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    model: str | None  # None: omitted from the body (headwise and llama-server accept that)
    kind: str = "openai"  # one of KINDS; decides the extension fields sent
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    ignore_eos: bool = True  # generate exactly max_tokens (servers that support it)
    temperature: float = 0.0
    request_timeout: float = 600.0  # seconds per request, end to end
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        return self.base_url.rstrip("/") + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def request_body(target: Target, prompt: Prompt) -> dict[str, Any]:
    """A streaming request with usage in the last chunk; token ids per chunk where the server
    offers them (headwise, vLLM), so coalesced chunks count exactly."""
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": prompt.max_tokens, "temperature": target.temperature}
    if target.model is not None:
        body["model"] = target.model
    if target.endpoint == "chat":
        body["messages"] = list(prompt.messages or ({"role": "user", "content": prompt.text or ""},))
    else:
        body["prompt"] = prompt.text if prompt.text is not None else _flatten(prompt.messages or ())
    if target.ignore_eos and target.kind != "openai":
        body["ignore_eos"] = True
    if target.kind in ("headwise", "vllm"):
        body["return_token_ids"] = True
    body.update(target.extra_body)
    return body


def _flatten(messages) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages)


def detect_kind(metrics_text: str | None, has_props: bool) -> str:
    """From GET /metrics and whether GET /props answers: vLLM exports vllm:* families (and, with
    the headwise plugin, headwise_* ones beside them: still vLLM, whose request fields and
    /tokenize it speaks); headwise exports only headwise_*; llama-server answers /props."""
    names = _family_names(metrics_text or "")
    if any(n.startswith("vllm:") for n in names):
        return "vllm"
    if any(n.startswith("headwise_") for n in names):
        return "headwise"
    return "llamacpp" if has_props else "openai"


def _family_names(text: str) -> set[str]:
    """Metric names of the sample and # TYPE lines (not words inside # HELP text)."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 3:
                names.add(parts[2])
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


async def probe(client, base_url: str, headers: Mapping[str, str]) -> tuple[str, str | None]:
    """(kind, first served model id or None), from GET /metrics, /props and /v1/models."""
    base = base_url.rstrip("/")

    async def get(path: str):
        try:
            r = await client.get(base + path, headers=dict(headers), timeout=10)
        except Exception:  # unreachable routes just mean "not that kind"
            return None
        return r if r.status_code == 200 else None

    metrics, props, models = await get("/metrics"), await get("/props"), await get("/v1/models")
    model = None
    if models is not None:
        try:
            data = models.json().get("data") or []
            model = data[0].get("id") if data else None
        except (ValueError, AttributeError):
            model = None
    return detect_kind(metrics.text if metrics is not None else None, props is not None), model
