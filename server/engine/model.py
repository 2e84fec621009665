"""Llama-family decoder forward pass (Llama 2/3, SmolLM, TinyLlama, Mistral, Qwen2).

Reads top to bottom: embed -> L x (RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU ->
residual) -> final RMSNorm on the rows that sample -> LM head. Tokens of all sequences in a
step are flattened to T rows; attention is the only place sequences are told apart, through
the attention backend and its per-step plan passed in explicitly (server/engine/attention/).
K/V are read and written only by the backend, through the paged cache. Weights use Hugging Face
names (loader.py); each projection is a Linear of server/engine/weights.py, in the format the
engine asked for (fp32, bf16, int8, int4).

References: Hugging Face modeling_llama.py / modeling_qwen2.py (the exactness reference in
tests), gpt-fast model.py, Llama 3.1 RoPE scaling.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING, Any

from server.config import ModelConfig, RopeScaling
from server.engine.timing import LayerTimer
from server.engine.layer_ops import LayerOps, load_layer_ops
from server.engine.weights import Embedding, Linear, WeightSource

if TYPE_CHECKING:
    from server.engine.attention import AttentionBackend

logger = logging.getLogger(__name__)


def load_gpu_layer_ops(dtype: torch.dtype) -> LayerOps | None:
    """The Triton layer ops (triton_layer_ops.py) for dtype activations, or None, with a warning,
    where triton cannot be imported (the model then runs torch ops)."""
    try:
        from server.engine.triton_layer_ops import triton_layer_ops
    except Exception as exc:  # triton missing or broken
        logger.warning("headwise: the fused Triton layer ops are unavailable (%s: %s); the model runs torch ops",
                       type(exc).__name__, exc)
        return None
    return triton_layer_ops(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, one fused op. x [T, C], weight [C] -> [T, C]."""
    return F.rms_norm(x, weight.shape, weight, eps)  # [T, C]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [D/2] with linear or llama3-style scaling applied."""
    # float32 throughout, as Hugging Face computes it, so positions rotate bit-identically.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # [D/2]
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq                                              # [D/2]
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)  # [D/2]
        smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor))             # [D/2]
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled           # [D/2]
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)                 # [D/2]
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [P, D] in the rotate-half layout (each frequency used twice)."""
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # [D/2]
    pos = torch.arange(max_positions, dtype=torch.float32)                      # [P]
    angles = torch.outer(pos, inv_freq)                                         # [P, D/2]
    emb = torch.cat([angles, angles], dim=-1)                                   # [P, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos, sin [T, D] -> [T, heads, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [T, heads, D]
    return x * cos[:, None, :] + rotated * sin[:, None, :]         # [T, heads, D]


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor        # [C]
    qkv: Linear                     # [C] -> [(H + 2 KVH) D]
    o_proj: Linear                  # [H D] -> [C]
    post_attention_norm: torch.Tensor  # [C]
    gate_up: Linear                 # [C] -> [2 I]
    down: Linear                    # [I] -> [C]


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor              # [S, V] for the sampled rows
    telemetry: torch.Tensor | None    # [L, R, H, NUM_ACCUMULATORS] telemetry rows, or None
    attention_times: tuple[float, ...] | None = None  # seconds per layer, when a timer was given


class LlamaModel:
    """Weights plus the forward pass. Build with from_weights(cfg, WeightSource(...))."""

    def __init__(self, cfg: ModelConfig, embed: Embedding, layers: list[DecoderLayer], norm: torch.Tensor,
                 lm_head: Linear, max_positions: int, device: torch.device, layer_ops: LayerOps | None = None) -> None:
        self.cfg = cfg
        self.layer_ops = layer_ops  # fused glue for half-precision projections (layer_ops.py), or None
        self.embed = embed    # ids [T] -> [T, C]
        self.layers = layers
        self.norm = norm      # [C]
        self.lm_head = lm_head
        cos, sin = rope_tables(cfg, max_positions)
        self.cos = cos.to(device)  # [P, D]
        self.sin = sin.to(device)  # [P, D]

    @staticmethod
    def projection_dtype(layers: list[DecoderLayer], lm_head: Linear) -> torch.dtype:
        """The dtype every projection casts its input to (bfloat16 for int4, int8 and bf16
        weights, float16 for fp16), float32 when any is fp32 or they differ: values the model
        computes are rounded to it before they matter anyway."""
        dtypes = {lin.act_dtype for layer in layers for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)}
        dtypes.add(lm_head.act_dtype)
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.projection_dtype(self.layers, self.lm_head)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: WeightSource, max_positions: int | None = None) -> LlamaModel:
        """Build every projection through weights (its format and device decide the kernels)."""
        w = weights.tensor
        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
            qkv_bias = [p + f"self_attn.{x}_proj.bias" for x in "qkv"] if cfg.attention_bias else None
            layers.append(DecoderLayer(
                input_norm=w(p + "input_layernorm.weight"), qkv=weights.linear(qkv, qkv_bias),
                o_proj=weights.linear([p + "self_attn.o_proj.weight"]),
                post_attention_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=weights.linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                down=weights.linear([p + "mlp.down_proj.weight"])))
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        lm_head = weights.linear([head], lm_head=True)
        # the fused glue hands half precision to every projection: only when all of them take it anyway
        act = cls.projection_dtype(layers, lm_head)
        ops = None
        if weights.fused_ops and weights.device.type == "cuda" and act != torch.float32:
            ops = load_gpu_layer_ops(act)
        elif weights.fused_ops and weights.device.type == "cpu" and act == torch.bfloat16:
            ops = load_layer_ops()
        return cls(cfg, weights.embedding("model.embed_tokens.weight"), layers, w("model.norm.weight"),
                   lm_head, max_positions or cfg.max_position_embeddings, weights.device, ops)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend, plan: Any,
                sample_rows: torch.Tensor, timer: LayerTimer | None = None, num_decodes: int | None = None,
                sample_decodes: int | None = None) -> ForwardOutput:
        """input_ids, positions [T]; attention and plan: the backend and its prepare() of this
        step; sample_rows [S] rows whose logits are wanted; timer, when given, times each layer's
        attention (telemetry included). num_decodes: the first rows are decodes (the rest prefill
        chunks), sample_decodes: the first sample rows are; projections pick their kernel by
        row kind (weights.split_rows). None: every row alike."""
        bd, sd = num_decodes, sample_decodes
        cfg = self.cfg
        h, d = cfg.num_heads, cfg.head_dim
        cos, sin = self.cos[positions], self.sin[positions]          # [T, D]
        x = self.embed(input_ids)                                    # [T, C] the residual stream
        normed = self._norm(x, self.layers[0].input_norm)            # [T, C]
        telemetry = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, normed, cos, sin, bd)         # [T, H, D], [T, KVH, D], [T, KVH, D]
            if timer is not None:
                timer.start()
            attn, st = attention.forward(i, q, k, v, plan)           # [T, H, D], [R, H, 4]
            if timer is not None:
                timer.stop()
            if st is not None:
                telemetry.append(st)
            y = layer.o_proj(attn.reshape(-1, h * d), bd, keep_bf16=self.layer_ops is not None)  # [T, C]
            x, normed = self._add_norm(x, y, layer.post_attention_norm)
            y = self._mlp(layer, normed, bd)                         # [T, C]
            if i < last:
                x, normed = self._add_norm(x, y, self.layers[i + 1].input_norm)  # [T, C], [T, C]
            else:
                x = x + y                                            # [T, C]
        logits = self.lm_head(self._norm(x[sample_rows], self.norm), sd)  # [S, V]
        return ForwardOutput(logits=logits, telemetry=torch.stack(telemetry) if telemetry else None,  # [L, R, H, 4]
                             attention_times=timer.seconds() if timer is not None else None)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x [T, C]: in the projections' half precision through the fused op where
        there is one (the quantized CPU path, bf16 / fp16 on a GPU), else float32."""
        if self.layer_ops is not None:
            return self.layer_ops.rms_norm(x, weight, self.cfg.rms_norm_eps)  # [T, C] half
        return rms_norm(x, weight, self.cfg.rms_norm_eps)                         # [T, C]

    def _add_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual x [T, C] plus a sublayer's output y [T, C], and its RMSNorm: one fused op
        where there is one (x updated in place, the sum in float32 as torch's add), else torch ops."""
        if self.layer_ops is not None:
            return x, self.layer_ops.add_rms_norm(x, y, weight, self.cfg.rms_norm_eps)  # [T, C], [T, C] half
        x = x + y                                                    # [T, C]
        return x, rms_norm(x, weight, self.cfg.rms_norm_eps)         # [T, C], [T, C]

    def _qkv(self, layer: DecoderLayer, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             bd: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q/k/v projection and RoPE of the normed residual [T, C] -> q [T, H, D], k, v [T, KVH, D]."""
        h, kvh, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        if self.layer_ops is not None:  # the fused ops take a GEMM's half-precision output as it is
            qkv = layer.qkv(normed, bd, keep_bf16=True)              # [T, (H + 2 KVH) D]
            return self.layer_ops.qkv_rope(qkv, cos, sin, h, kvh)
        qkv = layer.qkv(normed, bd)                                  # [T, (H + 2 KVH) D]
        qk, v = qkv.split([(h + kvh) * d, kvh * d], dim=-1)          # [T, (H + KVH) D], [T, KVH D]
        qk = apply_rope(qk.view(-1, h + kvh, d), cos, sin)           # [T, H + KVH, D] one rotation for both
        q, k = qk.split([h, kvh], dim=1)                             # [T, H, D], [T, KVH, D]
        return q, k, v.reshape(-1, kvh, d)

    def _mlp(self, layer: DecoderLayer, normed: torch.Tensor, bd: int | None) -> torch.Tensor:
        """SwiGLU of the normed residual [T, C] -> [T, C]."""
        if self.layer_ops is not None:  # half-precision GEMM outputs go to the fused ops as they are
            gate_up = layer.gate_up(normed, bd, keep_bf16=True)      # [T, 2 I]
            return layer.down(self.layer_ops.silu_mul(gate_up), bd, keep_bf16=True)  # [T, C]
        gate_up = layer.gate_up(normed, bd)                          # [T, 2 I]
        gate, up = gate_up.chunk(2, dim=-1)                          # [T, I] x2
        return layer.down(F.silu(gate) * up, bd)                     # [T, C]
