"""`headwise serve` reads its bind address from $HEADWISE_HOST / $HEADWISE_PORT (the container
image sets them); flags still win, and unset or empty variables keep the documented defaults."""

from __future__ import annotations

import pytest

from server.cli import build_parser, server_config


def _serve_args(argv, monkeypatch, **env):
    for name in ("HEADWISE_HOST", "HEADWISE_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(["serve", *argv])


def test_defaults_without_env(monkeypatch):
    cfg = server_config(_serve_args([], monkeypatch))
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8000)


def test_env_sets_host_and_port(monkeypatch):
    cfg = server_config(_serve_args([], monkeypatch, HEADWISE_HOST="0.0.0.0", HEADWISE_PORT="9001"))
    assert (cfg.host, cfg.port) == ("0.0.0.0", 9001)


def test_flags_override_env(monkeypatch):
    args = _serve_args(["--host", "127.0.0.2", "--port", "9002"], monkeypatch,
                       HEADWISE_HOST="0.0.0.0", HEADWISE_PORT="9001")
    assert (args.host, args.port) == ("127.0.0.2", 9002)


def test_empty_env_means_default(monkeypatch):
    args = _serve_args([], monkeypatch, HEADWISE_HOST="", HEADWISE_PORT="")
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_bad_port_env_is_a_usage_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        _serve_args([], monkeypatch, HEADWISE_PORT="http")
    assert exc.value.code == 2
    assert "--port" in capsys.readouterr().err
