"""Run by the slow tests with .venv-vllm's Python (never imported by pytest): one offline vLLM
engine on a model, greedy generation of token-id prompts, and the workers' telemetry reports
before and after, written as JSON.

    .venv-vllm/bin/python tests/vllm_plugin/vllm_driver.py SPEC.json OUT.json

SPEC: {"model": folder, "prompts": [[ids...]...], "max_tokens": n, "tp": 1, "max_model_len": 1024}.
The environment decides the rest (VLLM_PLUGINS="" runs without the plugin,
HEADWISE_TELEMETRY_SAMPLE_RATE, VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.monotonic()
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, tensor_parallel_size=spec.get("tp", 1),
              max_model_len=spec.get("max_model_len", 1024), seed=0,
              worker_extension_cls="server.vllm_plugin.worker.HeadwiseWorkerExtension")
    started = time.monotonic() - t0
    before = llm.collective_rpc("headwise_snapshot")
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    t1 = time.monotonic()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    generate_s = time.monotonic() - t1
    after = llm.collective_rpc("headwise_snapshot")
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "before": before, "after": after,
               "startup_s": started, "generate_s": generate_s}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
