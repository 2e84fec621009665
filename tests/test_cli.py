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


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_generate_chat(tiny_llama_dir, capsys, backend):
    assert main(["generate", "Hello", "--chat", "--model", tiny_llama_dir, "--max-tokens", "4",
                 "--max-model-len", "256", "--no-telemetry", "--attention-backend", backend]) == 0
    assert "mean normalized entropy" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "x", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--telemetry-sample-rate", "0"], "sample_rate"),
    (["generate", "x", "--attention-backend", "flash9"], "unknown --attention-backend 'flash9'; choose from auto, cpu, triton, torch"),
])
def test_bad_flags_fail_with_a_clear_message(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("headwise: error:") and needle in err and "Traceback" not in err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0 and "--chat" in capsys.readouterr().out


def test_serve_help_tells_which_routes_the_api_key_guards(capsys):
    """--api-key's help names the routes app.py leaves public (/metrics unless --metrics-require-key)."""
    from server.api.app import PUBLIC_PATHS
    from server.api.dashboard_page import DASHBOARD_PATHS

    assert PUBLIC_PATHS == {"/health", "/ready"} and "/dashboard" in DASHBOARD_PATHS
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("on every route except /health, /ready, the /dashboard page and its assets, and /metrics unless "
            "--metrics-require-key") in out
    assert "--metrics-require-key /metrics needs the API key too" in out


def test_serve_flags_reach_the_server_config():
    from server.cli import build_parser, server_config

    cfg = server_config(build_parser().parse_args(["serve", "--max-request-seqs", "3", "--stream-buffer-events", "9"]))
    assert (cfg.max_request_seqs, cfg.stream_buffer_events) == (3, 9)
    default = server_config(build_parser().parse_args(["serve"]))
    assert (default.max_request_seqs, default.stream_buffer_events) == (None, 2048)


def test_kv_cache_dtype_flag_reaches_the_engine_config(capsys):
    from server.cli import build_parser, engine_config

    assert engine_config(build_parser().parse_args(["serve"])).cache.dtype == "auto"
    assert engine_config(build_parser().parse_args(["serve", "--kv-cache-dtype", "bfloat16"])).cache.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_dtype_and_enforce_eager_flags_reach_the_engine_config(capsys):
    from server.cli import build_parser, engine_config

    default = engine_config(build_parser().parse_args(["serve"]))
    assert (default.dtype, default.enforce_eager) == ("auto", False)
    cfg = engine_config(build_parser().parse_args(["serve", "--dtype", "float16", "--enforce-eager"]))
    assert (cfg.dtype, cfg.enforce_eager) == ("float16", True)
    with pytest.raises(ValueError, match="dtype bfloat16 runs bf16 weights, which conflicts with weight format int4"):
        engine_config(build_parser().parse_args(["serve", "--dtype", "bfloat16", "--weight-format", "int4"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
