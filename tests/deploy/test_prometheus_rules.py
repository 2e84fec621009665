"""deploy/prometheus: promtool checks the scrape config and the rules, runs the rules' unit tests,
every rule has a test, and every metric the rules read is in a scrape of a live server.

Also the helpers test_grafana.py uses: PromQL metric names, promtool parsing of expressions,
and the scrape (a tiny-model server with some traffic)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import ServerProcess

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"

_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "start", "end", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords or label names)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                                   # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                                                  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                                 # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group())
    return names


def test_metric_names_extraction():
    expr = ('histogram_quantile(0.95, sum by (model, le) (rate(a_bucket{model=~"x|y", le!="1e-9"}[5m] offset 1h)))'
            ' > 2 and on (model) b:rec / ignoring(x) group_left c or vector(1) * 1e-3 unless count(d) by (z)')
    assert metric_names(expr) == {"a_bucket", "b:rec", "c", "d"}


def promtool_check_exprs(promtool: str, exprs: list[str], tmp_path: Path) -> None:
    """Parse each expression with promtool (as recording rules of a temporary rules file)."""
    rules = {"groups": [{"name": "parse", "rules": [{"record": f"parse:expr_{i}", "expr": e}
                                                   for i, e in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


_SCRAPE = pytest.StashKey[set]()


@pytest.fixture
def scraped_names(request, tiny_llama_dir, tmp_path_factory) -> set[str]:
    """Every sample name of /metrics of a live tiny-model server after a little traffic (one
    server per test session, kept in the session's stash: test_grafana.py uses it too)."""
    stash = request.config.stash
    if _SCRAPE not in stash:
        stash[_SCRAPE] = _scrape(tiny_llama_dir, tmp_path_factory)
    return stash[_SCRAPE]


def _scrape(tiny_llama_dir, tmp_path_factory) -> set[str]:
    srv = ServerProcess(["--model", tiny_llama_dir, "--max-model-len", "256"], tmp_path_factory.mktemp("logs"),
                        "scrape")
    try:
        srv.wait_ready()
        r = httpx.post(srv.url("/v1/completions"), timeout=60,
                       json={"prompt": "Hello world", "max_tokens": 24, "ignore_eos": True})
        assert r.status_code == 200, r.text
        text = httpx.get(srv.url("/metrics"), timeout=30).text
    finally:
        srv.stop()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def load_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def test_scrape_config(tool):
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    (job,) = cfg["scrape_configs"]
    assert job["scrape_interval"] == "5s" and job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["headwise:8000"]}]
    out = subprocess.run([tool("promtool"), "check", "config", str(PROM / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_check_and_unit_tests(tool):
    promtool = tool("promtool")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        out = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_has_a_unit_test():
    rules = load_rules()
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    silent = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    evaluated = " ".join(t["expr"] for case in tests for t in case.get("promql_expr_test", []))
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert {"HeadwiseTimeToFirstTokenSLO", "HeadwiseQueueSaturated", "HeadwiseKVCacheNearFull",
            "HeadwiseHighErrorRate", "HeadwiseHighRejectionRate", "HeadwiseEntropyCollapse"} <= alerts
    assert alerts <= fired, f"alerts never seen firing in alerts_test.yml: {alerts - fired}"
    assert {"HeadwiseTimeToFirstTokenSLO", "HeadwiseEntropyCollapse"} <= silent
    for rule in rules:
        if "record" in rule:
            assert rule["record"] in evaluated, f"recording rule {rule['record']} has no promql_expr_test"
        assert rule.get("labels", {}).get("severity") in (None, "info", "warning", "critical")
        if "alert" in rule:
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_use_only_exported_metrics(scraped_names):
    """headwise's names are in a live server's scrape; the vllm: ones (the alerts' vLLM side) are
    among the Grafana board's, which tests/vllm_plugin/test_real_vllm.py finds in a live vLLM
    server's scrape."""
    from tests.deploy.test_grafana import vllm_names

    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    used = set().union(*(metric_names(r["expr"]) for r in rules))
    assert used, "no metric names found"
    vllm = {n for n in used if n.startswith("vllm:")}
    assert vllm == {"vllm:time_to_first_token_seconds_bucket", "vllm:num_requests_waiting",
                    "vllm:kv_cache_usage_perc"} and vllm <= vllm_names()
    assert {n for n in used - vllm if ":" in n} <= recorded
    missing = {n for n in used if ":" not in n} - scraped_names
    assert not missing, f"the rules use metrics the server does not export: {sorted(missing)}"
