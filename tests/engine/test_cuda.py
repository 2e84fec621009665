"""The engine on a CUDA device (skipped without one): greedy tokens against transformers on the
same GPU (float32, decode steps through CUDA graphs; a random model of the default model's shape
too), batched against solo with graphs on, graphs against --enforce-eager, the bfloat16 default
(--dtype auto: Triton layer ops, a bfloat16 cache) against float32, telemetry against float64
math, per-head accumulators against the CPU engine, and the sampled per-layer attention time
through CUDA events."""

from __future__ import annotations

import math

import pytest
import torch

from server.config import CacheConfig, EngineConfig, SchedulerConfig, TelemetryConfig
from server.engine.attention.torch_ref import attend
from server.engine.telemetry import finalize_stats
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.metrics import Metrics
from tests.engine.attention.test_torch_ref import reference_row

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["The capital of France is", "Attention heads", "Hello world! 1 2 3", "A quick brown fox",
           "some attend to the first token", "héllo wörld", "look back over the context window", "Rome"]


def engine_on(device: str, path: str, dtype: str = "float32", eager: bool = False, **telemetry) -> Engine:
    return Engine(EngineConfig(model=path, device=device, dtype=dtype if device != "cpu" else "auto",
                               enforce_eager=eager, cache=CacheConfig(num_blocks=256),
                               scheduler=SchedulerConfig(max_model_len=1024), telemetry=TelemetryConfig(**telemetry)))


@pytest.fixture(scope="module")
def smollm2_shaped_dir(tmp_path_factory):
    """A random model of SmolLM2-135M's shape (no weights travel to a GPU machine)."""
    from benchmarks.bench_gpu import SMOLLM2_135M, random_llama

    path = str(tmp_path_factory.mktemp("smollm2-shaped"))
    random_llama(path, **SMOLLM2_135M)
    return path


@pytest.mark.parametrize("model", ["tiny", "smollm2_shaped"])
def test_greedy_matches_transformers_on_the_gpu(model, tiny_llama_dir, request):
    from transformers import AutoModelForCausalLM

    path = tiny_llama_dir if model == "tiny" else request.getfixturevalue("smollm2_shaped_dir")
    engine = engine_on("cuda", path)
    assert engine.runner.graphs is not None
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                               attn_implementation="eager").cuda().eval()
    for prompt in PROMPTS[:3]:
        ids = engine.tokenize(prompt)
        done = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids], device="cuda"), max_new_tokens=40, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        got = list(done.token_ids)
        if got != want:  # only a near-tie may part them (a random model's logits are close together)
            i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
            with torch.no_grad():
                logits = ref(torch.tensor([ids + want[:i]], device="cuda")).logits[0, -1]  # [V]
            assert (logits[want[i]] - logits[got[i]]).item() < 1e-4, (prompt, i)


def test_graphs_give_the_eager_tokens_and_telemetry(tiny_llama_dir):
    graphed, eager = engine_on("cuda", tiny_llama_dir), engine_on("cuda", tiny_llama_dir, eager=True)
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, head_telemetry=True)
    for a, b in zip(graphed.generate(PROMPTS[:5], params), eager.generate(PROMPTS[:5], params)):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for ra, rb in zip(a.head_telemetry.entropy, b.head_telemetry.entropy)
                   for x, y in zip(ra, rb)) < 1e-4


def test_bfloat16_default_tracks_float32(tiny_llama_dir):
    """--dtype auto on a GPU with bfloat16: bf16 weights and activations through the Triton layer
    ops, a bf16 cache; the first token's logprobs stay within bf16 rounding of float32's."""
    half, full = engine_on("cuda", tiny_llama_dir, "auto"), engine_on("cuda", tiny_llama_dir, "float32")
    model = half.runner.model
    assert model.activation_dtype == torch.bfloat16 and model.layer_ops is not None
    assert half.runner.cache.dtype == torch.bfloat16
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    for prompt in PROMPTS:
        a, b = half.generate([prompt], params)[0], full.generate([prompt], params)[0]
        la, lb = dict(a.logprobs[0].top), dict(b.logprobs[0].top)
        shared = la.keys() & lb.keys()
        assert b.token_ids[0] in la and max(abs(la[t] - lb[t]) for t in shared) < 0.1


def test_batched_equals_solo_and_cpu(tiny_llama_dir):
    gpu, cpu = engine_on("cuda", tiny_llama_dir), engine_on("cpu", tiny_llama_dir)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    batched = gpu.generate(PROMPTS, params)
    for prompt, b in zip(PROMPTS, batched):
        assert b.token_ids == gpu.generate([prompt], params)[0].token_ids
        assert b.token_ids == cpu.generate([prompt], params)[0].token_ids
    seeded = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True) for i in range(8)]
    together = gpu.generate(PROMPTS, seeded)
    for prompt, sp, t in zip(PROMPTS, seeded, together):
        assert t.token_ids == gpu.generate([prompt], sp)[0].token_ids


@pytest.mark.parametrize("n,qscale", [(1, 1.0), (17, 3.0), (1100, 1.0), (1100, 20.0)])
def test_attention_telemetry_matches_float64(n, qscale):
    g = torch.Generator().manual_seed(n)
    heads, kv_heads, d = 9, 3, 64
    q = torch.randn(1, heads, d, generator=g) * qscale
    k = torch.randn(1, n, kv_heads, d, generator=g)
    v = torch.randn(1, n, kv_heads, d, generator=g)
    out, acc = attend(q.cuda(), k.cuda(), v.cuda(), torch.tensor([n], device="cuda"), 1.0 / math.sqrt(d),
                      compute_stats=True)
    stats = finalize_stats(acc, torch.tensor([n], device="cuda")).cpu()
    ref_out, ref_stats = reference_row(q[0], k[0], v[0])
    assert torch.allclose(out[0].cpu().double(), ref_out, atol=1e-5, rtol=1e-4)
    assert (stats[0].double() - ref_stats).abs().max().item() < 1e-5


def test_head_stats_and_timing_match_the_cpu_engine(tiny_llama_dir):
    gpu = engine_on("cuda", tiny_llama_dir, attention_time_sample_rate=1.0)
    cpu = engine_on("cpu", tiny_llama_dir)
    metrics = Metrics(gpu, "tiny")
    steps = []
    gpu.add_observer(steps.append)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    gpu.generate(PROMPTS, params)
    cpu.generate(PROMPTS, params)
    a, b = gpu.head_stats_snapshot(), cpu.head_stats_snapshot()
    assert torch.equal(a.counts, b.counts) and a.rows == 8 * 16
    assert (a.means() - b.means()).abs().max().item() < 1e-4
    layers = gpu.model_config.num_layers
    assert all(st.attention_times is not None and len(st.attention_times) == layers for st in steps)
    assert all(0 < t < st.step_time for st in steps for t in st.attention_times)
    assert b"headwise_head_normalized_entropy_count" in metrics.render()
