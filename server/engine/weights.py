"""Weight formats behind one Linear seam: fp32, bf16, int8, int4 (GGUF blocks kept).

A projection is built once at start-up from its source weight, either a dense float tensor or a
QuantizedTensor (a GGUF Q4_0 / Q4_1 / Q8_0 matrix in its own blocks), and a format:

  fp32  F.linear in float32 over the dequantized weight: the exactness reference.
  bf16  F.linear in bfloat16 (activations cast on the way in, the output cast back to float32,
        or left in bfloat16 for the fused layer ops; on a CPU the weight prepacked for oneDNN).
  fp16  the same in float16 (for GPUs without bfloat16; on a CPU it runs, slowly).
  int8  Q8_0 blocks (a float16 scale per 32 weights): the file's own for a Q8_0 tensor, else
        quantized from the values at load; bfloat16 activations.
  int4  the GGUF's Q4_0 / Q4_1 blocks as they are: w = (q - 8) d or q d + m; bfloat16 activations.

Both run on our CPU kernel (quant_matmul.py, csrc/quant_matmul.cpp), which multiplies the file's
exact values (the integers exactly in bfloat16, d and m in float16) and decodes each weight tile
once for all the decode rows of a step. Where it cannot be built (a CPU without AVX-512 BF16, no
compiler) they run on torch's weight-only kernels instead, with one warning: int4 on
_weight_int4pack_mm_for_cpu (group 32, scale = d and zero = m + 8 d rounded to bfloat16, at most
2^-9 relative), int8 on _weight_int8pack_mm (one symmetric scale per output row, re-quantized from
the values: not exact for Q8_0).

On CUDA the precision comes from --dtype (format_for_dtype): auto is bf16 where the GPU has
bfloat16, else fp16; the int formats are CPU kernels. On a CPU, auto picks per tensor the
closest fast format to the file's own: Q4_0 / Q4_1 -> int4, Q8_0 ->
int8, float16 / bfloat16 -> bf16, float32 and every other GGUF type (dequantized by the loader)
-> fp32. An explicit int4 needs Q4_0 / Q4_1 blocks (anything else is an error naming the tensor
and its type); int8, bf16 and fp32 take any source. The quantized kernels are CPU kernels, and
fast only with bfloat16 activations: with float32 ones they are 6-10x slower than dense fp32
(BENCHMARKS.md), so the residual stream stays float32 and each quantized projection casts its
input. The int8 and int4 kernels compute each row on its own, bit for bit whatever the batch
(tested); the dense fp32 and bf16 GEMMs block differently for different row counts, so their
last bits can move with the batch.

Prefill rows: the quantized kernels are made for a few rows (torch's compute one row at a time;
ours decodes each weight once per 8 rows, but a dense bf16 GEMM is still faster for the 256-row
chunks of a prompt, 2.4x against torch's at 128 rows), so an int4 /
int8 projection also keeps a bfloat16 copy of its weights (the file's values rounded once) and
runs prefill rows through it, decode rows through the quantized kernel (split_rows). The kernel
follows the row's kind, never the batch size, so a decode's tokens never depend on its batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from server.config import DTYPE_FORMATS, WEIGHT_FORMATS
from server.engine.host_memory import Arena
from server.engine.quant_matmul import QuantMatmul, load_quant_matmul, pack_blocks, quantize_q8_0

GROUP = 32                              # weights per GGUF block (Q4_0, Q4_1, Q8_0)
QUANT_KINDS = ("Q4_0", "Q4_1", "Q8_0")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_INT4_N_MULTIPLE = 16                   # the CPU int4 packer wants out rows in multiples of 16


class WeightFormatError(ValueError):
    """A requested format cannot hold a tensor (names the tensor and its type)."""


@dataclass(frozen=True)
class QuantizedTensor:
    """A GGUF block-quantized matrix [out, in] kept in its own form (group 32 along `in`).

    Q4_0: w = (q - 8) d; Q4_1: w = q d + m; Q8_0: w = q d.
    """

    kind: str                    # "Q4_0" | "Q4_1" | "Q8_0"
    q: torch.Tensor              # [out, in] uint8 in 0..15 (Q4_*), int8 (Q8_0)
    scales: torch.Tensor         # [out, in / 32] float16: d
    mins: torch.Tensor | None    # [out, in / 32] float16: m (Q4_1), else None

    def __post_init__(self) -> None:
        out, k = self.q.shape
        if self.kind not in QUANT_KINDS or k % GROUP or tuple(self.scales.shape) != (out, k // GROUP):
            raise ValueError(f"malformed {self.kind} tensor: q {list(self.q.shape)}, scales {list(self.scales.shape)}")
        if (self.mins is not None) != (self.kind == "Q4_1"):
            raise ValueError(f"{self.kind}: mins must be given exactly for Q4_1")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], the same values gguf's dequantize gives."""
        out, k = self.q.shape
        q = self.q.view(out, k // GROUP, GROUP).float()                   # [out, G, 32]
        d = self.scales.float()[..., None]                                # [out, G, 1]
        if self.kind == "Q4_0":
            w = (q - 8.0) * d
        elif self.kind == "Q4_1":
            w = q * d + self.mins.float()[..., None]
        else:
            w = q * d
        return w.reshape(out, k)                                          # [out, in]

    def take_rows(self, rows: torch.Tensor) -> QuantizedTensor:
        """The same tensor restricted (and reordered) to rows [n] of out."""
        return QuantizedTensor(self.kind, self.q[rows], self.scales[rows],
                               None if self.mins is None else self.mins[rows])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Its parts as safetensors entries under name (see from_tensors)."""
        parts = {f"{name}.q": self.q, f"{name}.scales": self.scales}
        if self.mins is not None:
            parts[f"{name}.mins"] = self.mins
        return parts

    @classmethod
    def from_tensors(cls, kind: str, parts: dict[str, torch.Tensor], name: str) -> QuantizedTensor:
        return cls(kind, parts[f"{name}.q"], parts[f"{name}.scales"], parts.get(f"{name}.mins"))

    @classmethod
    def from_gguf_blocks(cls, kind: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        """Parse GGUF blocks: raw uint8 [out, in / 32 * block bytes] (a ReaderTensor's data)."""
        out, k = shape
        nb = k // GROUP
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out, nb, _BLOCK_BYTES[kind])  # [out, G, bytes]
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]                                     # [out, G]
        if kind == "Q8_0":
            q = blocks[..., 2:].copy().view(np.int8).reshape(out, k)                              # [out, in]
            return cls(kind, torch.from_numpy(q), torch.from_numpy(d), None)
        start = 4 if kind == "Q4_1" else 2
        qs = blocks[..., start:start + 16]                                                       # [out, G, 16]
        # byte j of a block holds element j (low nibble) and element j + 16 (high nibble)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(out, k)                        # [out, in]
        mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]) if kind == "Q4_1" else None
        return cls(kind, torch.from_numpy(q), torch.from_numpy(d), mins)


def source_kind(w: torch.Tensor | QuantizedTensor) -> str:
    """A weight's own type, for auto and for error messages: Q4_1, F32, BF16, ..."""
    if isinstance(w, QuantizedTensor):
        return w.kind
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(w.dtype, str(w.dtype))


def dense(w: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    """float32 values of a weight."""
    return w.dequantize() if isinstance(w, QuantizedTensor) else w.to(torch.float32)


def resolve_format(requested: str, w: torch.Tensor | QuantizedTensor, name: str, device: torch.device) -> str:
    """The concrete format of one projection weight (see the module docstring)."""
    if requested not in WEIGHT_FORMATS:
        raise WeightFormatError(f"unknown weight format {requested!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    kind = source_kind(w)
    cpu = device.type == "cpu"
    if requested == "auto":
        if not cpu:
            return "fp32"
        return {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8", "F16": "bf16", "BF16": "bf16"}.get(kind, "fp32")
    if requested in ("int4", "int8") and not cpu:
        raise WeightFormatError(f"weight format {requested} runs on CPUs only (device {device}); use auto, fp32 or bf16")
    if requested == "int4" and kind not in ("Q4_0", "Q4_1"):
        raise WeightFormatError(
            f"tensor {name} is {kind}; weight format int4 keeps Q4_0 / Q4_1 blocks only "
            f"(use auto, int8, bf16 or fp32)")
    return requested


def format_for_dtype(dtype: str, weight_format: str, device: torch.device) -> str:
    """The weight format to ask for, given --dtype and --weight-format: a named dtype sets the
    format (a different explicit format is an error); auto leaves it to weight_format, except that
    on CUDA auto/auto is bf16 where the GPU has bfloat16, else fp16."""
    if dtype == "auto":
        if device.type == "cuda" and weight_format == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return weight_format
    if dtype not in DTYPE_FORMATS:
        raise WeightFormatError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPE_FORMATS)}")
    fmt = DTYPE_FORMATS[dtype]
    if weight_format not in ("auto", fmt):
        raise WeightFormatError(f"dtype {dtype} runs {fmt} weights, which conflicts with weight format "
                                f"{weight_format}; give one of them")
    return fmt


class Fp32Linear:
    """F.linear in float32: the reference."""

    format = "fp32"
    act_dtype = torch.float32               # what the input is cast to

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight                    # [out, in] float32
        self.bias = bias                        # [out] or None

    def __call__(self, x: torch.Tensor, num_decodes: int | None = None, keep_bf16: bool = False) -> torch.Tensor:
        """[T, in] -> float32 [T, out] (keep_bf16 changes nothing here)."""
        return F.linear(x, self.weight, self.bias)  # [T, in] -> [T, out]


PREPACK_ROWS = 256                      # the row count oneDNN's weight layout is chosen for (a prefill chunk)


def prepack_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """weight bfloat16 [out, in] reordered once into oneDNN's blocked layout, or None where that is
    unavailable (not a CPU tensor, torch without oneDNN bfloat16). F.linear reorders the weight on
    every call; the prepacked one gives the same values (the same kernel) 11% faster for a 256-row
    chunk and 29% for a 64-row one (BENCHMARKS.md)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_ROWS)                # [out, in] opaque
    except (AttributeError, RuntimeError):   # an op this torch build lacks: the plain GEMM
        return None


class Bf16Linear:
    """F.linear in bfloat16 (weights prepacked for oneDNN on CPUs); float32 in and out, or the
    GEMM's own bfloat16 output when the caller takes it (keep_bf16, no bias: the same values)."""

    format = "bf16"
    act_dtype = torch.bfloat16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.to(self.act_dtype).contiguous()                               # [out, in]
        self.out_features = weight.shape[0]
        self.packed = prepack_bf16(weight) if self.act_dtype == torch.bfloat16 else None  # [out, in] opaque or None
        self.weight = weight if self.packed is None else None                         # [out, in] or None
        self.bias = bias                                                              # [out] float32 or None

    def dense_weight(self) -> torch.Tensor:
        """The bfloat16 values [out, in]."""
        return self.weight if self.packed is None else self.packed.to_dense()

    def __call__(self, x: torch.Tensor, num_decodes: int | None = None,
                 out: torch.Tensor | None = None, keep_bf16: bool = False) -> torch.Tensor:
        """[T, in] -> float32 [T, out] (bfloat16 with keep_bf16 and no bias); written into out
        (float32 [T, out]) when given."""
        xb = x.to(self.act_dtype).contiguous()                                        # [T, in]
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "")  # [T, out] bf16
        else:
            y = F.linear(xb, self.weight)                                             # [T, out] bf16
        if out is not None:
            out.copy_(y)                                                              # [T, out] widened exactly
            return out if self.bias is None else out.add_(self.bias)
        if keep_bf16 and self.bias is None:
            return y
        y = y.float()                                                                 # [T, out]
        return y if self.bias is None else y + self.bias


class Fp16Linear(Bf16Linear):
    """Bf16Linear in float16 (keep_bf16 keeps the GEMM's float16 output)."""

    format = "fp16"
    act_dtype = torch.float16


class Int8Linear:
    """Weight-only int8; bfloat16 activations. With our kernel (quant_matmul.py): Q8_0 blocks,
    the file's own when it has them, else quantized here with a scale per 32 weights. Without it:
    torch's kernel with one symmetric scale per output row, re-quantized from the values."""

    format = "int8"
    act_dtype = torch.bfloat16

    def __init__(self, w: torch.Tensor | QuantizedTensor, bias: torch.Tensor | None,
                 prefill: Bf16Linear | None = None, kernel: QuantMatmul | None = None,
                 arena: Arena | None = None) -> None:
        self.bias = bias
        self.prefill = prefill
        self.kernel = kernel
        if kernel is not None:
            q, d = (w.q, w.scales) if isinstance(w, QuantizedTensor) and w.kind == "Q8_0" else quantize_q8_0(dense(w))
            self.blocks = pack_blocks("Q8_0", q, d, None, None if arena is None else arena.copy)
            return
        weight = dense(w)                                                            # [out, in]
        amax = weight.abs().amax(dim=1).clamp_min(1e-30)                             # [out]
        # the scale the kernel uses is the bfloat16 one: quantize against exactly it
        scale = (amax / 127.0).to(torch.bfloat16)                                    # [out]
        self.qweight = (weight / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)  # [out, in]
        self.scales = scale                                                          # [out]

    def __call__(self, x: torch.Tensor, num_decodes: int | None = None, keep_bf16: bool = False) -> torch.Tensor:
        return split_rows(self._quantized, self.prefill, x, num_decodes, keep_bf16)  # [T, out]

    def _quantized(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.mm(x, self.blocks, self.bias, out)                    # [T, out]
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales).float()  # [T, out]
        return into(y if self.bias is None else y + self.bias, out)


class Int4Linear:
    """GGUF Q4_0 / Q4_1 blocks; bfloat16 activations. With our kernel (quant_matmul.py) in the
    file's own values; without it in torch's CPU int4 layout (group 32, scale and zero rounded to
    bfloat16)."""

    format = "int4"
    act_dtype = torch.bfloat16

    def __init__(self, w: QuantizedTensor, bias: torch.Tensor | None, prefill: Bf16Linear | None = None,
                 kernel: QuantMatmul | None = None, arena: Arena | None = None) -> None:
        self.bias = bias
        self.prefill = prefill
        self.kernel = kernel
        if kernel is not None:
            self.blocks = pack_blocks(w.kind, w.q, w.scales, w.mins, None if arena is None else arena.copy)
            return
        out, k = w.shape
        pad = -out % _INT4_N_MULTIPLE
        q = w.q.to(torch.int32)                                                      # [out, in]
        d = w.scales.float()                                                         # [out, G]
        zero = w.mins.float() + 8.0 * d if w.kind == "Q4_1" else torch.zeros_like(d)  # [out, G]
        if pad:  # padding rows: q = 8, scale 0, zero 0 -> weight 0
            q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.int32)])           # [out + pad, in]
            d = torch.cat([d, d.new_zeros(pad, d.shape[1])])                         # [out + pad, G]
            zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])             # [out + pad, G]
        self.out_features = out
        self.padded = bool(pad)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # [out + pad, in / 2] uint8
        self.scales_zeros = torch.stack([d, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, out + pad, 2]

    def __call__(self, x: torch.Tensor, num_decodes: int | None = None, keep_bf16: bool = False) -> torch.Tensor:
        return split_rows(self._quantized, self.prefill, x, num_decodes, keep_bf16)  # [T, out]

    def _quantized(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.mm(x, self.blocks, self.bias, out)                    # [T, out]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP,
                                                        self.scales_zeros).float()  # [T, out + pad]
        if self.padded:
            y = y[:, :self.out_features]                                             # [T, out]
        return into(y if self.bias is None else y + self.bias, out)


Linear = Fp32Linear | Bf16Linear | Fp16Linear | Int8Linear | Int4Linear


def into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """y, or y copied into out when out is given."""
    return y if out is None else out.copy_(y)


def split_rows(quantized, prefill: Bf16Linear | None, x: torch.Tensor, num_decodes: int | None,
               keep_bf16: bool = False) -> torch.Tensor:
    """Decode rows (the first num_decodes of x [T, in]) through the quantized kernel, prefill rows
    through the dense bfloat16 copy when there is one: each row's kernel depends on its kind, never
    on the batch, and prefill chunks get the GEMM that is fast at many rows. A mixed step's two
    parts are written into one output (no concatenation). Float32 out, except a prefill-only
    step's with keep_bf16 (the dense GEMM's own bfloat16 values)."""
    if prefill is None or num_decodes is None or num_decodes >= x.shape[0]:
        return quantized(x)                                                          # [T, out]
    if num_decodes == 0:
        return prefill(x, keep_bf16=keep_bf16)                                       # [T, out]
    out = x.new_empty(x.shape[0], prefill.out_features, dtype=torch.float32)         # [T, out]
    quantized(x[:num_decodes], out[:num_decodes])                                    # [Bd, out]
    prefill(x[num_decodes:], out=out[num_decodes:])                                  # [T - Bd, out]
    return out


def make_linear(w: torch.Tensor | QuantizedTensor, bias: torch.Tensor | None, fmt: str, name: str,
                device: torch.device, dense_prefill: bool = False, quant_kernel: bool = True,
                arena: Arena | None = None) -> Linear:
    """One projection in its resolved format (resolve_format first: fmt must be concrete).
    dense_prefill: an int4 / int8 projection also keeps a bfloat16 copy for prefill rows;
    quant_kernel: int4 / int8 run on our kernel (quant_matmul.py) where it is built, else on torch's;
    arena: where that kernel's blocks go (host_memory.Arena: huge pages), else ordinary memory."""
    if fmt in ("int4", "int8"):
        if fmt == "int4" and (not isinstance(w, QuantizedTensor) or w.kind not in ("Q4_0", "Q4_1")):
            raise WeightFormatError(f"tensor {name} is {source_kind(w)}; int4 needs Q4_0 / Q4_1 blocks")
        prefill = Bf16Linear(dense(w), bias) if dense_prefill else None
        kernel = load_quant_matmul() if quant_kernel else None
        cls = Int4Linear if fmt == "int4" else Int8Linear
        return cls(w, bias, prefill, kernel, arena)
    values = dense(w).to(device)                                                     # [out, in]
    if fmt == "bf16":
        return Bf16Linear(values, bias)
    if fmt == "fp16":
        return Fp16Linear(values, bias)
    if fmt == "fp32":
        return Fp32Linear(values.contiguous(), bias)
    raise WeightFormatError(f"unknown weight format {fmt!r}")


def stack_rows(parts: list[torch.Tensor | QuantizedTensor]) -> torch.Tensor | QuantizedTensor:
    """Concatenate weights along out (q/k/v -> qkv, gate/up -> gate_up), keeping blocks when
    every part has the same quantized kind, else as float32."""
    kinds = {source_kind(p) for p in parts}
    if len(kinds) == 1 and isinstance(parts[0], QuantizedTensor):
        return QuantizedTensor(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]),
                               None if parts[0].mins is None else torch.cat([p.mins for p in parts]))
    return torch.cat([dense(p) for p in parts])                                       # [sum out, in]


class Embedding:
    """Row lookup of the token embedding: float32 rows from a dense table, or dequantized on the
    fly from Q8_0 / Q4 blocks (the table stays in its blocks)."""

    def __init__(self, w: torch.Tensor | QuantizedTensor, device: torch.device) -> None:
        self.quantized = w if isinstance(w, QuantizedTensor) and device.type == "cpu" else None
        self.table = None if self.quantized is not None else dense(w).to(device).contiguous()  # [V, C]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[ids]                                                    # [T, C]
        return self.quantized.take_rows(ids).dequantize()                            # [T, C]


@dataclass(frozen=True)
class WeightSource:
    """What the model builds its projections from: float32 weights by Hugging Face name, the
    blocks of those a GGUF kept, and the requested format (one for every projection)."""

    dense: Mapping[str, torch.Tensor]             # float32 [out, in] / [C], HF names
    quantized: Mapping[str, QuantizedTensor]      # HF name -> blocks (a subset of dense)
    weight_format: str = "auto"
    device: torch.device = torch.device("cpu")
    dense_prefill: bool = True                    # int4 / int8 projections keep a bf16 copy for prefill rows
    fused_ops: bool = True                        # the model may use layer_ops.py's fused glue (CPU, bf16 inputs)
    quant_kernel: bool = True                     # int4 / int8 on our kernel (quant_matmul.py) where it is built
    # the kernel's blocks, read whole by every decode step, packed together on huge pages
    arena: Arena = field(default_factory=Arena)

    def source(self, name: str) -> torch.Tensor | QuantizedTensor:
        return self.quantized.get(name, self.dense[name])

    def tensor(self, name: str) -> torch.Tensor:
        """A float32 tensor (norms, biases): a private, aligned copy on the device (the loader
        may hand out memory-mapped file pages)."""
        return self.dense[name].to(device=self.device, dtype=torch.float32, copy=True)

    def linear(self, names: list[str], bias_names: list[str] | None = None, lm_head: bool = False) -> Linear:
        """One projection over the weights `names` stacked along out (q, k, v -> qkv). The LM head
        keeps no prefill copy: it only sees the rows that sample, a few per step."""
        parts = [self.source(n) for n in names]
        w = parts[0] if len(parts) == 1 else stack_rows(parts)
        label = names[0] if len(names) == 1 else "+".join(names)
        fmt = resolve_format(self.weight_format, w, label, self.device)
        bias = torch.cat([self.tensor(n) for n in bias_names]) if bias_names else None  # [out]
        return make_linear(w, bias, fmt, label, self.device, self.dense_prefill and not lm_head, self.quant_kernel,
                           self.arena)

    def embedding(self, name: str) -> Embedding:
        return Embedding(self.source(name), self.device)
