"""Frozen configuration dataclasses, validated on construction.

ModelConfig describes a checkpoint (filled by the loader); CacheConfig, SchedulerConfig and
TelemetryConfig describe how the engine runs it; EngineConfig groups them; ServerConfig is how
the HTTP layer runs. Nothing writes back
into a config after construction: derived values are computed by the code that needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_ROPE_KINDS = ("default", "linear", "llama3")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind "default" means none; "linear" divides positions by factor;
    "llama3" rescales low frequencies as in Llama 3.1 (factor, low/high_freq_factor,
    original_max_position)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        _require(self.kind in SUPPORTED_ROPE_KINDS,
                 f"unsupported rope scaling {self.kind!r}; supported: {', '.join(SUPPORTED_ROPE_KINDS)}")
        _require(self.factor > 0, "rope scaling factor must be > 0")
        _require(self.high_freq_factor > self.low_freq_factor > 0 or self.kind != "llama3",
                 "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Llama-family decoder."""

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(self.architecture in SUPPORTED_ARCHITECTURES,
                 f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps), "rms_norm_eps must be > 0")
        _require(self.rope_theta > 0 and math.isfinite(self.rope_theta), "rope_theta must be > 0")

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. The number of blocks comes from memory_bytes unless num_blocks is given.
    dtype: one of KV_CACHE_DTYPES; auto = on a CPU bfloat16 where the model's projections take
    bfloat16 activations anyway (the quantized path), else float32; on CUDA the activation dtype
    (runner.kv_cache_dtype)."""

    block_size: int = 16
    memory_bytes: int = 1 << 30
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 f"block_size must be a power of two, got {self.block_size}")
        _require(self.memory_bytes > 0, "KV cache memory must be > 0 bytes")
        _require(self.num_blocks is None or self.num_blocks > 0, "num_blocks must be > 0")
        _require(self.dtype in KV_CACHE_DTYPES,
                 f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits. max_model_len None means the model's context window."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "max_num_seqs must be > 0")
        _require(self.max_num_batched_tokens >= self.max_num_seqs,
                 "max_num_batched_tokens must be >= max_num_seqs (every running sequence needs a token per step)")
        _require(self.max_model_len is None or self.max_model_len > 1, "max_model_len must be > 1")


@dataclass(frozen=True)
class TelemetryConfig:
    """Per-head attention telemetry. sample_rate is the fraction of engine steps that compute it;
    attention_time_sample_rate the fraction of steps whose per-layer attention time is measured
    (0 turns it off); per_head_histograms keeps a normalized-entropy histogram per (layer, head)
    besides the per-layer one (high cardinality when exported)."""

    enabled: bool = True
    sample_rate: float = 1.0
    sink_tokens: int = 4
    histogram_buckets: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    attention_time_sample_rate: float = 0.1
    per_head_histograms: bool = False

    def __post_init__(self) -> None:
        _require(0.0 < self.sample_rate <= 1.0 and math.isfinite(self.sample_rate),
                 f"telemetry sample_rate must be in (0, 1], got {self.sample_rate}")
        _require(self.sink_tokens > 0, "sink_tokens must be > 0")
        _require(0.0 <= self.attention_time_sample_rate <= 1.0 and math.isfinite(self.attention_time_sample_rate),
                 f"attention_time_sample_rate must be in [0, 1], got {self.attention_time_sample_rate}")
        _require(list(self.histogram_buckets) == sorted(set(self.histogram_buckets)),
                 "histogram buckets must be strictly increasing")


WEIGHT_FORMATS = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_FORMATS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # the weight format each dtype runs


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs. model None means the default model (SmolLM2-135M-Instruct)."""

    model: str | None = None
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    seed: int = 0
    num_threads: int | None = None
    attention_backend: str = "auto"  # "auto" = the best available on device; a name forces one
    weight_format: str = "auto"      # one of WEIGHT_FORMATS; auto = per tensor, the file's own (weights.py)
    dtype: str = "auto"              # one of DTYPES: the projections' weights and activations (weights.format_for_dtype)
    enforce_eager: bool = False      # no CUDA graphs for decode steps

    def __post_init__(self) -> None:
        _require(self.device == "cpu" or self.device.startswith("cuda"),
                 f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        _require(bool(self.attention_backend), "attention_backend must not be empty")
        _require(self.weight_format in WEIGHT_FORMATS,
                 f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weight_format!r}")
        _require(self.num_threads is None or self.num_threads > 0, "num_threads must be > 0")
        _require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(self.dtype == "auto" or self.weight_format in ("auto", DTYPE_FORMATS[self.dtype]),
                 f"dtype {self.dtype} runs {DTYPE_FORMATS.get(self.dtype)} weights, which conflicts with weight "
                 f"format {self.weight_format}; give one of them")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings.

    max_queue bounds the engine requests admitted beyond the running batch: at most
    max_num_seqs + max_queue engine requests are in flight (a request with n choices counts n);
    past that a request is answered 503 with Retry-After without touching the engine.
    max_request_seqs caps the sequences (n x prompts) one request may ask for, so that no single
    request fills the running batch; None means half of max_num_seqs, at least 1 (the serving
    layer computes it: it knows max_num_seqs).
    stream_buffer_events bounds the token events kept for one streaming request whose client is
    not reading; past it the request is aborted (reason slow_consumer).
    drain_timeout is how long SIGTERM waits for in-flight requests before aborting them.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    metrics_require_key: bool = False
    max_queue: int = 256
    drain_timeout: float = 30.0
    max_body_bytes: int = 4 * 2**20
    cors_origins: tuple[str, ...] = ()
    served_model_names: tuple[str, ...] = ()  # extra names the "model" field may use; the first is listed
    max_n: int = 16                  # choices per request
    max_prompts: int = 16            # prompts in one /v1/completions batch
    max_request_seqs: int | None = None  # n x prompts of one request; None: max(1, max_num_seqs // 2)
    stream_buffer_events: int = 2048     # events buffered for a stream's client before it counts as stalled
    retry_after_s: int = 1           # Retry-After on 503
    warmup: bool = True              # run a 2-token request before /ready turns 200

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        _require(bool(self.host), "host must not be empty")
        _require(self.api_key is None or len(self.api_key) > 0, "api key must not be empty")
        _require(self.max_queue >= 0, f"max_queue must be >= 0, got {self.max_queue}")
        _require(math.isfinite(self.drain_timeout) and self.drain_timeout >= 0,
                 f"drain_timeout must be >= 0 seconds, got {self.drain_timeout}")
        _require(self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        _require(all(o and o.strip() == o for o in self.cors_origins), "CORS origins must be non-empty strings")
        _require(all(n and len(n) <= 256 for n in self.served_model_names), "served model names must be 1-256 chars")
        _require(self.max_n >= 1 and self.max_prompts >= 1, "max_n and max_prompts must be >= 1")
        _require(self.max_request_seqs is None or self.max_request_seqs >= 1,
                 f"max_request_seqs must be >= 1, got {self.max_request_seqs}")
        _require(self.stream_buffer_events >= 1, f"stream_buffer_events must be >= 1, got {self.stream_buffer_events}")
        _require(self.retry_after_s >= 1, "retry_after_s must be >= 1")
