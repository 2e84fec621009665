"""benchmarks/bench_gpu_triton.py (issue 14's GPU figures) without a GPU: it imports, its --help
names every figure, it refuses clearly without CUDA, and --device cpu --smoke runs its whole
flow on tiny shapes (torch backend and transformers; the table and the JSON)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_gpu_triton


def test_help_names_every_figure(capsys):
    with pytest.raises(SystemExit) as done:
        bench_gpu_triton.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for needle in ("SmolLM2-135M", "Llama-3.2-1B", "weight-read floor", "telemetry on vs off", "batch 1, 16 and 128",
                   "static batch of 128", "--json", "--smoke"):
        assert needle in text, needle


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_refuses_without_cuda(capsys):
    assert bench_gpu_triton.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert bench_gpu_triton.main(["--device", "cpu"]) == 2
    assert "only with --smoke" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the triton backend would run interpreted: minutes
    out = tmp_path / "smoke.json"
    assert bench_gpu_triton.main(["--device", "cpu", "--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["smoke"] and res["small"]["backends"] == ["torch"]
    assert [row["batch"] for row in res["small"]["decode"]] == [1, 4]
    assert res["large"]["torch_step_ms"] > 0 and res["large"]["copy_floor_ms"] > 0
    assert "1B batch 1: torch step / floor (x)" in capsys.readouterr().out
