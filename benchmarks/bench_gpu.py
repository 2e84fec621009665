"""GPU benchmark on a randomly initialized model of SmolLM2-135M's shape (no weights travel):
headwise's engine against transformers' generate on the same weights, one run, same GPU.

    python -m benchmarks.bench_gpu [--new-tokens 64] [--json out.json]

Reports single-stream decode tokens/s, aggregate tokens/s for 16 concurrent sequences (and
transformers' static padded batch of 16), the telemetry cost per decode step (on and off,
alternating steps), and the time to render /metrics with 30 x 9 heads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from benchmarks.bench_engine import telemetry_cost
from benchmarks.report import emit
from server.config import CacheConfig, EngineConfig, SchedulerConfig, TelemetryConfig
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.request import SamplingParams
from server.metrics import Metrics


def log(msg: str) -> None:
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


# LlamaConfig fields of the shapes the GPU benchmarks use (random weights: no weights travel).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def random_llama(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", **shape) -> int:
    """Save a randomly initialized Llama with the LlamaConfig fields shape (and the tests' tiny
    tokenizer) as a Hugging Face folder at path, its weights in dtype; returns its parameter count.
    device: where to initialize (a GPU initializes a 1B model in a second)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def smollm2_shaped(path: str, layers: int = 30) -> None:
    random_llama(path, **{**SMOLLM2_135M, "num_hidden_layers": layers})


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a smoke run")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (default 30, SmolLM2-135M's)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    n = args.new_tokens
    path = tempfile.mkdtemp()
    smollm2_shaped(path, args.layers)
    loaded = load_model(path)
    dev = args.device
    mk = lambda **t: Engine(EngineConfig(model=path, device=dev, cache=CacheConfig(memory_bytes=1 << 30),
                                         scheduler=SchedulerConfig(max_model_len=2048),
                                         telemetry=TelemetryConfig(**t)), loaded=loaded)
    engine = mk()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    prompts = [list(range(5 + i, 105 + i)) for i in range(16)]   # 100-token prompts
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    res: dict = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "torch": torch.__version__, "new_tokens": n}

    def hf_gen(ids: list[list[int]], tokens: int) -> float:
        t0 = sync_time()
        with torch.no_grad():
            hf.generate(torch.tensor(ids, device=dev), max_new_tokens=tokens, min_new_tokens=tokens,
                        do_sample=False, pad_token_id=0)
        return sync_time() - t0

    log("warm-up")
    engine.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    hf_gen(prompts[:1], 8)
    hf_gen(prompts, 8)

    log("single stream")
    done = engine.generate(prompts[:1], params)[0]
    ours1 = done.stats.decode_tokens_per_s
    hf1 = (n - 1) / (hf_gen(prompts[:1], n) - hf_gen(prompts[:1], 1))
    res["single_stream_decode_tokens_per_s"] = {"headwise": ours1, "transformers": hf1, "ratio": ours1 / hf1}
    log(str(res["single_stream_decode_tokens_per_s"]))

    log("16 concurrent")
    t0 = sync_time()
    engine.generate(prompts, params)
    ours16 = 16 * n / (sync_time() - t0)
    hf16 = 16 * n / hf_gen(prompts, n)
    res["concurrent_16_tokens_per_s"] = {"headwise": ours16, "transformers_static_batch": hf16, "ratio": ours16 / hf16}
    log(str(res["concurrent_16_tokens_per_s"]))

    log("telemetry cost")
    ab = mk(sample_rate=0.5, attention_time_sample_rate=0.0)  # steps alternate: telemetry on, off, ...
    res["telemetry"] = [telemetry_cost(ab, b, 48, 3, prompt=lambda eng, i: prompts[i % 16]) for b in (1, 16)]
    log(str(res["telemetry"]))

    metrics = Metrics(engine, "smollm2-shaped")
    metrics.render()
    t0 = time.perf_counter()
    for _ in range(10):
        body = metrics.render()
    res["scrape_render_ms"] = (time.perf_counter() - t0) / 10 * 1000
    res["scrape_bytes"] = len(body)
    log(f"render {res['scrape_render_ms']:.1f} ms")
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
