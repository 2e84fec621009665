"""GGUF file -> Hugging Face model folder (config.json, model.safetensors, tokenizer files).

Reading a GGUF is slow in Python (opening it with gguf.GGUFReader parses every tokenizer string,
about 4.4 s for SmolLM2-135M; dequantizing takes about 2 s more and building the tokenizer from
the metadata about 9 s), so the loader converts a GGUF once and caches the result as an ordinary
Hugging Face folder that later loads read directly:

    <cache_dir>/gguf/<key>/config.json              HF config (LlamaForCausalLM or Qwen2ForCausalLM)
                           generation_config.json   bos and every end-of-generation id
                           model.safetensors        float32 weights under Hugging Face names
                           quantized.blocks         the Q4_0 / Q4_1 / Q8_0 matrices in their own
                                                    blocks (safetensors format, another extension so
                                                    that Hugging Face loaders read the folder as usual)
                           tokenizer.json, ...      tokenizer.save_pretrained (chat template included)
                           headwise.json            the source GGUF, its size and mtime, the model name

<key> is the first 16 hex digits of sha256(realpath, size, mtime_ns, CONVERTER_VERSION), so an
edited or replaced GGUF, or a new converter, gets a fresh folder. <cache_dir> is
$HEADWISE_CACHE_DIR or ~/.cache/headwise. Deleting a <key> folder (or the whole gguf/ folder) is
always safe: the next load converts again. A folder is written under a temporary name
(.<key>.tmp-*) and renamed into place with os.replace, so a crash never leaves a half-written
cache and concurrent loaders of the same file are safe (the first rename wins).

Transformations (references: llama.cpp convert_hf_to_gguf.py, gguf-py quants.py and
transformers' GGUF loader):
  * dequantize every tensor with gguf.quants.dequantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
    Q8_0, the K-quants, IQ*, ...) to float32; a GGUF [ne0=in, ne1=out] tensor becomes [out, in];
  * keep the blocks of Q4_0, Q4_1 and Q8_0 matrices too (server/engine/weights.py runs them
    without dequantizing); the row permutation below applies to them as well;
  * rename llama.cpp names to Hugging Face names (blk.N.attn_q -> model.layers.N.self_attn.q_proj);
  * undo the row permutation llama.cpp applies to attn_q / attn_k of arch "llama" / "mistral"
    (its RoPE rotates interleaved pairs, Hugging Face's rotates halves); "qwen2" is not permuted;
  * a rope_freqs tensor (Llama 3.1 RoPE scaling) is turned back into llama3 rope_scaling when it
    matches llama3's formula with the usual constants.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file

from server.engine.errors import CorruptModelError, ModelLoadError, UnsupportedModelError
from server.engine.weights import QUANT_KINDS, QuantizedTensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONVERTER_VERSION = 2
QUANTIZED_FILE = "quantized.blocks"
MARKER_FILE = "headwise.json"
_STALE_TMP_SECONDS = 3600.0

# GGUF general.architecture -> (HF class, HF model_type, attn_q/attn_k rows permuted by llama.cpp)
_ARCHITECTURES = MappingProxyType({
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
})

_GLOBAL_NAMES = MappingProxyType({
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
})

_BLOCK_NAMES = MappingProxyType({
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
})

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_FREQS = "rope_freqs.weight"

# Exceptions the gguf reader raises on a truncated or garbage file (it indexes, reshapes and
# decodes memory-mapped bytes without bounds checks).
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, UnicodeError)


@dataclass(frozen=True)
class GgufModel:
    """A GGUF read into Hugging Face form, ready to be validated and written as a folder."""

    name: str                                  # file stem, e.g. "SmolLM2-135M-Instruct.Q4_1"
    config_json: dict[str, Any]                # HF config.json contents
    generation_config: dict[str, Any]          # HF generation_config.json contents
    weights: dict[str, torch.Tensor]           # HF names, float32, contiguous
    source_names: dict[str, str]               # HF name -> GGUF tensor name (for error messages)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)  # HF name -> its own blocks


def cache_folder(gguf_path: str, cache_dir: str) -> str:
    """The cache folder for this GGUF file as it is now (path, size and mtime)."""
    real = os.path.realpath(gguf_path)
    st = os.stat(real)
    key_text = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{CONVERTER_VERSION}"
    key = hashlib.sha256(key_text.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, "gguf", key)


def is_converted(folder: str) -> bool:
    """True when folder is a complete conversion (the marker is written last, and the folder
    only appears by an atomic rename)."""
    return os.path.isfile(os.path.join(folder, MARKER_FILE))


def read_marker(folder: str) -> dict[str, Any]:
    """headwise.json of a converted folder."""
    marker = os.path.join(folder, MARKER_FILE)
    try:
        with open(marker, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptModelError(marker, f"unreadable cache marker ({e}); delete {folder} to convert again") from e
    if not isinstance(data, dict):
        raise CorruptModelError(marker, f"cache marker is not a JSON object; delete {folder} to convert again")
    return data


def open_gguf(path: str) -> GGUFReader:
    """Open a GGUF; a truncated or garbage file raises CorruptModelError naming it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(path, f"cannot read the file: {e}") from e
    if magic != b"GGUF":
        raise CorruptModelError(path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except _PARSE_ERRORS as e:
        raise CorruptModelError(path, f"corrupt or truncated GGUF ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise ModelLoadError(path, f"cannot read the file: {e}") from e


def dequantize_tensor(tensor: ReaderTensor, path: str) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in row-major HF orientation: GGUF dims
    [ne0, ne1, ...] (ne0 fastest) become shape [..., ne1, ne0], i.e. [out, in] for a matrix."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise UnsupportedModelError(
            path, f"tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot dequantize") from e
    except _PARSE_ERRORS as e:
        raise CorruptModelError(path, f"tensor {tensor.name} ({tensor.tensor_type.name}): bad data ({e})") from e
    if values.size != math.prod(shape):
        raise CorruptModelError(path, f"tensor {tensor.name}: {values.size} values for shape {list(shape)}")
    values = values.reshape(shape)
    if values.dtype != np.float32 or not values.flags.writeable or not values.flags.c_contiguous:
        values = np.array(values, dtype=np.float32, order="C")  # copies out of the read-only memory map
    return torch.from_numpy(values)


def unpermute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's permute of attn_q / attn_k rows (interleaved -> half RoPE)."""
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, -1)  # [H, D/2, 2, in]
    return w.swapaxes(1, 2).reshape(weight.shape).contiguous()  # [H*D, in]


def read_gguf(path: str, progress: Callable[[str], None]) -> GgufModel:
    """Metadata and dequantized tensors of a llama / mistral / qwen2 GGUF, in Hugging Face form."""
    reader = open_gguf(path)
    meta = _Metadata(reader, path)
    gguf_arch = meta.string("general.architecture")
    if gguf_arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            path, f"GGUF architecture {gguf_arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    if meta.integer("split.count", 1) > 1:
        raise UnsupportedModelError(
            path, "split GGUF files are not supported; merge them with llama-gguf-split --merge")
    if not meta.has("tokenizer.ggml.model"):
        raise UnsupportedModelError(
            path, "the GGUF has no tokenizer metadata (tokenizer.ggml.model); headwise needs one")
    hf_class, model_type, permuted = _ARCHITECTURES[gguf_arch]

    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise CorruptModelError(path, "missing tensor token_embd.weight")
    embed_shape = [int(d) for d in by_name["token_embd.weight"].shape.tolist()]  # [hidden, vocab]
    config = _hf_config(meta, gguf_arch, hf_class, model_type, embed_shape,
                        tied="output.weight" not in by_name)
    config["rope_scaling"] = _rope_scaling(meta, gguf_arch, by_name.get(_ROPE_FREQS), config, path)

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, torch.Tensor] = {}
    source_names: dict[str, str] = {}
    quantized: dict[str, QuantizedTensor] = {}
    tensors = [t for t in reader.tensors if t.name != _ROPE_FREQS]
    step = max(1, len(tensors) // 10)
    for i, tensor in enumerate(tensors, start=1):
        hf_name = _hf_name(tensor.name, path)
        value = dequantize_tensor(tensor, path)
        rows = None
        if permuted and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_head if hf_name.endswith("q_proj.weight") else n_kv
            if value.dim() != 2 or value.shape[0] % (2 * heads) != 0:
                raise CorruptModelError(
                    path, f"tensor {tensor.name} has shape {list(value.shape)}, not [{heads} * head_dim, hidden]")
            value = unpermute_rope_rows(value, heads)
            rows = unpermute_rope_rows(torch.arange(value.shape[0])[:, None], heads)[:, 0]  # [out] source row of each row
        weights[hf_name] = value
        source_names[hf_name] = tensor.name
        if tensor.tensor_type.name in QUANT_KINDS and value.dim() == 2:
            blocks = QuantizedTensor.from_gguf_blocks(tensor.tensor_type.name, tensor.data, tuple(value.shape))
            if rows is not None:
                blocks = blocks.take_rows(rows)
            quantized[hf_name] = blocks
        if i % step == 0 or i == len(tensors):
            progress(f"dequantizing {i}/{len(tensors)} tensors")

    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": _eos_ids(meta)}
    name = os.path.basename(path)
    name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return GgufModel(name=name, config_json=config, generation_config=generation_config,
                     weights=weights, source_names=source_names, quantized=quantized)


def build_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) transformers builds from the GGUF metadata."""
    from transformers import AutoTokenizer  # heavy import, only needed on first conversion

    folder, file_name = os.path.split(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=file_name, local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean "no usable tokenizer"
        raise UnsupportedModelError(
            path, f"cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: {e})") from e


def write_folder(folder: str, model: GgufModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Write the converted model into folder atomically (temporary sibling + os.replace).
    If another process finished the same folder first, keep theirs."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        save_file(model.weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if model.quantized:
            parts = {k: v for name, t in model.quantized.items() for k, v in t.tensors(name).items()}
            kinds = json.dumps({name: t.kind for name, t in model.quantized.items()})
            save_file(parts, os.path.join(tmp, QUANTIZED_FILE), metadata={"format": "pt", "kinds": kinds})
        _write_json(os.path.join(tmp, "config.json"), model.config_json)
        _write_json(os.path.join(tmp, "generation_config.json"), model.generation_config)
        tokenizer.save_pretrained(tmp)
        real = os.path.realpath(source)
        st = os.stat(real)
        _write_json(os.path.join(tmp, MARKER_FILE), {
            "source": real, "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns,
            "converter_version": CONVERTER_VERSION, "name": model.name,
        })
        # mkdtemp makes the folder private (0700); a converted public model is readable by all,
        # so an image built by one user serves another's processes
        os.chmod(tmp, 0o755)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        try:
            os.replace(tmp, folder)
        except OSError as e:
            if is_converted(folder):  # another loader finished first: keep its folder
                return
            hint = f"; delete {folder} (an incomplete leftover) and retry" if os.path.isdir(folder) else ""
            raise ModelLoadError(folder, f"cannot move the GGUF conversion into place: {e}{hint}") from e
    except OSError as e:
        raise ModelLoadError(folder, f"cannot write the GGUF conversion cache: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Metadata:
    """Typed access to GGUF key/values; wrong or missing values raise CorruptModelError."""

    _MISSING = object()

    def __init__(self, reader: GGUFReader, path: str) -> None:
        self._reader = reader
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def has(self, key: str) -> bool:
        return self._reader.get_field(key) is not None

    def value(self, key: str, default: Any = _MISSING) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            if default is self._MISSING:
                raise CorruptModelError(self._path, f"missing GGUF metadata key {key}")
            return default
        try:
            kind = field.types[0]
            if kind == GGUFValueType.ARRAY:
                return [_part_value(field.parts[i], field.types[-1]) for i in field.data]
            return _part_value(field.parts[field.data[0]], kind)
        except _PARSE_ERRORS as e:
            raise CorruptModelError(self._path, f"unreadable GGUF metadata key {key} ({e})") from e

    def integer(self, key: str, default: Any = _MISSING) -> int:
        value = self.value(key, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # per-layer array with one value
        if isinstance(value, bool) or not isinstance(value, int):
            raise CorruptModelError(self._path, f"GGUF metadata key {key} should be an integer, got {value!r}")
        return value

    def optional_integer(self, key: str) -> int | None:
        return self.integer(key) if self.has(key) else None

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self.value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CorruptModelError(self._path, f"GGUF metadata key {key} should be a number, got {value!r}")
        return float(value)

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self.value(key, default)
        if not isinstance(value, str):
            raise CorruptModelError(self._path, f"GGUF metadata key {key} should be a string, got {value!r}")
        return value


def _part_value(part: np.ndarray, kind: GGUFValueType) -> Any:
    if kind == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part[0]
    if kind == GGUFValueType.FLOAT32:
        return float(str(value))  # shortest decimal of the float32: 1e-05, not 9.999999747378752e-06
    return value.item()


def _hf_config(meta: _Metadata, arch: str, hf_class: str, model_type: str,
               embed_shape: list[int], tied: bool) -> dict[str, Any]:
    hidden = meta.integer(f"{arch}.embedding_length")
    n_head = meta.integer(f"{arch}.attention.head_count")
    n_kv = meta.integer(f"{arch}.attention.head_count_kv", n_head)
    head_dim = meta.integer(f"{arch}.attention.key_length", hidden // n_head if n_head else 0)
    rope_dim = meta.integer(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            meta.path, f"partial RoPE ({arch}.rope.dimension_count={rope_dim}, head_dim={head_dim}) is not supported")
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": embed_shape[-1] if len(embed_shape) == 2 else 0,
        "hidden_size": hidden,
        "intermediate_size": meta.integer(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.integer(f"{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": meta.integer(f"{arch}.context_length"),
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.number(f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": meta.optional_integer("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.optional_integer("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def _eos_ids(meta: _Metadata) -> list[int]:
    """Every end-of-generation id the GGUF names (eos, end-of-turn, end-of-message)."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token = meta.optional_integer(key)
        if token is not None and token >= 0 and token not in ids:
            ids.append(token)
    return ids


def _rope_scaling(meta: _Metadata, arch: str, rope_freqs: ReaderTensor | None,
                  config: dict[str, Any], path: str) -> dict[str, Any] | None:
    """HF rope_scaling from GGUF metadata (linear) or from a rope_freqs tensor (llama3)."""
    kind = meta.string(f"{arch}.rope.scaling.type", "none")
    factor = meta.number(f"{arch}.rope.scaling.factor", 0.0)
    if not meta.has(f"{arch}.rope.scaling.type") and meta.has(f"{arch}.rope.scale_linear"):
        kind, factor = "linear", meta.number(f"{arch}.rope.scale_linear")  # older files
    if kind == "linear" and factor not in (0.0, 1.0):
        scaling: dict[str, Any] | None = {"rope_type": "linear", "factor": factor}
    elif kind in ("none", "linear"):
        scaling = None
    else:
        raise UnsupportedModelError(
            path, f"rope scaling type {kind!r} is not supported (supported: none, linear, llama3)")
    if rope_freqs is None:
        return scaling
    if scaling is not None:
        raise UnsupportedModelError(path, "both rope_freqs and linear rope scaling are set; not supported")
    return _llama3_from_rope_freqs(dequantize_tensor(rope_freqs, path).numpy(), config, path)


def _llama3_from_rope_freqs(freqs: np.ndarray, config: dict[str, Any], path: str) -> dict[str, Any] | None:
    """Recover Llama 3.1 rope_scaling from llama.cpp's precomputed per-frequency divisors.
    They are only accepted when llama3's formula with the published constants reproduces them."""
    head_dim, theta = config["head_dim"], config["rope_theta"]
    if freqs.shape != (head_dim // 2,):
        raise CorruptModelError(path, f"tensor {_ROPE_FREQS} has shape {list(freqs.shape)}, expected [{head_dim // 2}]")
    if np.allclose(freqs, 1.0):
        return None
    factor, low, high, original = float(freqs.max()), 1.0, 4.0, 8192
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [D/2]
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    smooth = (original / wavelen - low) / (high - low)  # [D/2]
    expected = np.where(wavelen < original / high, 1.0,
                        np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))  # [D/2]
    if not np.allclose(freqs, expected, rtol=1e-4, atol=1e-6):
        raise UnsupportedModelError(
            path, f"tensor {_ROPE_FREQS} does not match llama3 RoPE scaling (factor {factor}, "
                  f"low {low}, high {high}, original context {original}); custom RoPE factors are not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


def _hf_name(gguf_name: str, path: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise UnsupportedModelError(path, f"tensor {gguf_name} is not part of a supported Llama/Qwen2 model")


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _remove_stale_temporaries(folder: str) -> None:
    """Remove temporary folders a crashed conversion of the same key left behind (over an hour old;
    a younger one may belong to a loader converting right now)."""
    parent, prefix = os.path.dirname(folder), f".{os.path.basename(folder)}.tmp-"
    now = time.time()
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass
