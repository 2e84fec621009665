"""Our forward pass against transformers on the same weights: logits within 1e-4 relative (float32)."""

from __future__ import annotations

import pytest
import torch

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.request import SamplingParams


def hf_model(path: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()


def prefill_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, computed in one prefill chunk by our model over
    the engine's paged cache and attention backend."""
    from server.engine.attention import AttentionMetadata

    bm, runner = engine.block_manager, engine.runner
    table: list[int] = []
    bm.allocate(table, bm.blocks_for(len(ids)))
    bs = runner.block_size
    n = len(ids)
    meta = AttentionMetadata(
        num_decodes=0, num_tokens=n, max_seq_len=n,
        slot_mapping=torch.tensor([table[p // bs] * bs + p % bs for p in range(n)]),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        block_table=torch.tensor([table], dtype=torch.int32),
        query_start_loc_cpu=torch.tensor([0, n], dtype=torch.int32), seq_lens_cpu=torch.tensor([n], dtype=torch.int32),
        stats_seqs_cpu=None)
    plan = runner.attention.prepare(meta)
    out = runner.model.forward(torch.tensor(ids), torch.arange(n), runner.attention, plan, torch.arange(n))
    bm.free(table)
    return out.logits  # [T, V]


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama_tied_dir", "tiny_qwen2_dir", "tiny_llama3_rope_dir"])
def test_tiny_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    engine = Engine(EngineConfig(model=path, cache=CacheConfig(num_blocks=256)))
    ref_model = hf_model(path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.model_config.vocab_size, (300,), generator=g).tolist()
    ours = prefill_logits(engine, ids)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert_close_rel(ours, ref)


def test_tiny_decode_path_matches_transformers(tiny_llama_dir):
    """Greedy generation through prefill + paged decode equals transformers' generate."""
    engine = Engine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=64),
                                 scheduler=SchedulerConfig(max_model_len=1024)))
    ref_model = hf_model(tiny_llama_dir)
    prompt = engine.tokenize("The capital of France is")
    done = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert list(done.token_ids) == ref


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_model):
    from server.engine.loader import default_model_path
    import os

    engine = Engine(EngineConfig(cache=CacheConfig(memory_bytes=512 << 20), weight_format="fp32"), loaded=default_model)
    gguf = default_model_path()
    ref_model = hf_model(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    ids = engine.tokenize("The quick brown fox jumps over the lazy dog. " * 12)
    ours = prefill_logits(engine, ids)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert_close_rel(ours, ref)
