"""`headwise generate`: streams text, prints the rate and the per-head table; bad flags fail clearly."""

from __future__ import annotations

import pytest

from server.cli import main


def test_generate_streams_and_prints_entropy_table(tiny_llama_dir, capsys):
    code = main(["generate", "The capital of France is", "--model", tiny_llama_dir, "--max-tokens", "6",
                 "--max-model-len", "256"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip() != "" or "6 tokens" in err
    assert "tokens, finish_reason=" in err
    assert "mean normalized entropy per (layer, head) over" in err
    table = [line for line in err.splitlines() if line.startswith("    ") and line.strip()[:1].isdigit()]
    assert len(table) == 3 and all(len(line.split()) == 1 + 4 for line in table)  # 3 layers x 4 heads


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_generate_chat(tiny_llama_dir, capsys, backend):
    assert main(["generate", "Hello", "--chat", "--model", tiny_llama_dir, "--max-tokens", "4",
                 "--max-model-len", "256", "--no-telemetry", "--attention-backend", backend]) == 0
    assert "mean normalized entropy" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "x", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--telemetry-sample-rate", "0"], "sample_rate"),
    (["generate", "x", "--attention-backend", "flash9"], "unknown --attention-backend 'flash9'; choose from auto, torch"),
])
def test_bad_flags_fail_with_a_clear_message(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("headwise: error:") and needle in err and "Traceback" not in err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0 and "--chat" in capsys.readouterr().out
