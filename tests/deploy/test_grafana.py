"""deploy/grafana: the provisioning files, the dashboard's structure and panels, every PromQL
expression parses (promtool) once Grafana's variables are substituted, and every headwise_ metric
it uses is in a scrape of a live server. The vllm: names (the same panels on vLLM carrying the
plugin) each stand beside their headwise_ equivalent; tests/vllm_plugin/test_real_vllm.py finds
them in a live vLLM scrape."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import yaml

from tests.deploy.test_prometheus_rules import metric_names, promtool_check_exprs, scraped_names  # noqa: F401

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "headwise.json").read_text())
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


PANELS = all_panels(DASHBOARD["panels"])
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}


def substitute(expr: str) -> list[str]:
    """The expression with every Grafana variable replaced: built-in intervals by durations,
    query variables by a match-all regex, custom variables by each of their values in turn."""
    def fill(text: str, values: dict[str, str]) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)

    names = {m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)\}|\$(\w+)", expr)}
    choices = {}
    for name in names:
        if name in BUILTINS:
            choices[name] = [BUILTINS[name]]
        elif VARIABLES[name]["type"] == "custom":
            choices[name] = [o["value"] for o in VARIABLES[name]["options"]]
        else:
            choices[name] = [".*"]
    keys = sorted(choices)
    return [fill(expr, dict(zip(keys, combo))) for combo in itertools.product(*(choices[k] for k in keys))]


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard (targets and variable queries), substituted."""
    raw = [t["expr"] for p in PANELS for t in p.get("targets", [])]
    for var in VARIABLES.values():
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            raw.append(m.group(1))
    return [e for expr in raw for e in substitute(expr)]


def test_provisioning():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    assert VARIABLES["datasource"]["current"]["value"] == source["uid"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "headwise.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_structure():
    assert DASHBOARD["uid"] == "headwise" and DASHBOARD["title"]
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in PANELS:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    refs = {v for e in [t["expr"] for p in PANELS for t in p.get("targets", [])]
            for v in re.findall(r"\$\{?(\w+)", e)}
    assert refs - set(BUILTINS) <= set(VARIABLES), f"undefined variables: {refs - set(BUILTINS) - set(VARIABLES)}"


def panels_using(pattern: str, kind: str | None = None) -> list[dict]:
    return [p for p in PANELS if (kind is None or p["type"] == kind)
            and any(re.search(pattern, t["expr"]) for t in p.get("targets", []))]


def test_required_panels():
    assert panels_using(r"headwise_layer_normalized_entropy_bucket", "heatmap"), "per-layer entropy histogram heatmap"
    (grid,) = [p for p in panels_using(r"headwise_head_\$\{stat\}_sum", "table")
               if any(t["id"] == "groupingToMatrix" for t in p["transformations"])]
    expr = grid["targets"][0]["expr"]
    assert "rate(headwise_head_${stat}_sum" in expr and "rate(headwise_head_${stat}_count" in expr
    assert "sum by (layer, head)" in expr
    for family in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert panels_using(rf"histogram_quantile\(.*headwise_{family}_seconds_bucket", "timeseries"), family
        assert panels_using(rf"histogram_quantile\(.*vllm:{family}_seconds_bucket", "timeseries"), family
    for metric in ("headwise_generation_tokens_total", "headwise_kv_cache_usage_ratio",
                   "headwise_num_requests_waiting", "headwise_num_requests_running",
                   "headwise_num_preemptions_total", "headwise_requests_rejected_total", "headwise_model_info"):
        assert panels_using(metric), metric
    assert [o["value"] for o in VARIABLES["stat"]["options"]] == [
        "normalized_entropy", "sink_mass", "lookback_distance", "max_weight", "entropy_nats"]


def test_every_expression_parses(tool, tmp_path):
    exprs = expressions()
    assert len(exprs) > 30
    promtool_check_exprs(tool("promtool"), exprs, tmp_path)


def test_every_metric_is_exported(scraped_names):  # noqa: F811
    used = {n for e in expressions() for n in metric_names(e) if not n.startswith("vllm:")}
    assert len(used) > 20
    missing = used - scraped_names
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"


def vllm_names() -> set[str]:
    return {n for e in expressions() for n in metric_names(e) if n.startswith("vllm:")}


def test_vllm_names_stand_beside_their_headwise_equivalents():
    """On vLLM the latency, throughput and load panels read vLLM's own families: each vllm: name
    is `or`-ed with the headwise_ family it is the equivalent of (loadtests' mapping, docs/metrics.md),
    selected by vLLM's label model_name with the same $model."""
    from loadtests.server_metrics import family

    pairs = 0
    for expr in (t["expr"] for p in PANELS for t in p.get("targets", [])):
        names = metric_names(expr)
        for name in sorted(n for n in names if n.startswith("vllm:")):
            assert any(family(h, "vllm") == name for h in names if h.startswith("headwise_")), (name, expr)
            assert f'{name}{{model_name=~"$model"}}' in expr and " or " in expr, expr
            pairs += 1
    assert pairs >= 25 and len(vllm_names()) == 16
