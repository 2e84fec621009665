"""The server's own view of a run: /metrics read before and after, differenced.

Family names are DESIGN.md's (vLLM's semantics under the headwise_ prefix); against vLLM the same
families under its vllm: prefix (KV cache usage is vllm:kv_cache_usage_perc there). A family the
server does not export is None here and "n/a" in the table.

The per-head view (HeadView) reads the per-(layer, head) summaries headwise serve exports, which
vLLM exports too when it carries the headwise plugin (server/vllm_plugin, with
headwise_telemetry_up beside them): the run's rows and mean statistics per head.

Only prometheus_client's text parser is used; nothing is registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from server.latency import Histogram
from server.samples import Snapshot, counter_delta, histogram_delta  # noqa: F401 (re-exported)

HISTOGRAMS = {  # report key -> histogram family
    "ttft": "headwise_time_to_first_token_seconds",
    "tpot": "headwise_request_time_per_output_token_seconds",
    "itl": "headwise_inter_token_latency_seconds",
    "e2e": "headwise_e2e_request_latency_seconds",
    "queue": "headwise_request_queue_time_seconds",
    "prefill": "headwise_request_prefill_time_seconds",
    "decode": "headwise_request_decode_time_seconds",
}
COUNTERS = {  # report key -> counter sample name
    "prompt_tokens": "headwise_prompt_tokens_total",
    "generation_tokens": "headwise_generation_tokens_total",
    "request_success": "headwise_request_success_total",
    "requests_rejected": "headwise_requests_rejected_total",
    "preemptions": "headwise_num_preemptions_total",
}
GAUGES = {
    "running": "headwise_num_requests_running",
    "waiting": "headwise_num_requests_waiting",
    "kv_cache_usage": "headwise_kv_cache_usage_ratio",
}

VLLM_NAMES = {"headwise_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc"}  # the rest: prefix swapped
HEAD_FAMILIES = {  # statistic -> per-(layer, head) summary family (server/exposition.py)
    "entropy": "headwise_head_entropy_nats",
    "normalized_entropy": "headwise_head_normalized_entropy",
    "max_weight": "headwise_head_max_weight",
    "sink_mass": "headwise_head_sink_mass",
    "lookback_distance": "headwise_head_lookback_distance",
}
TELEMETRY_UP = "headwise_telemetry_up"  # the vLLM plugin's health (absent on headwise serve)


def family(name: str, kind: str) -> str:
    """A headwise_ family name as the server of `kind` exports it."""
    if kind != "vllm":
        return name
    return VLLM_NAMES.get(name, "vllm:" + name.removeprefix("headwise_"))


@dataclass(frozen=True)
class HeadView:
    """Per-(layer, head) statistics over the telemetry rows of one run (after minus before)."""

    layers: int
    heads: int
    rows: list[list[int]]                          # [layer][head] rows counted in the run
    means: dict[str, list[list[float | None]]]     # statistic -> [layer][head] mean (None: no rows)
    telemetry_up: float | None                     # vLLM plugin: 1 active on every rank, 0 not; None: absent

    @property
    def total_rows(self) -> int:
        return sum(sum(r) for r in self.rows)

    def overall(self, stat: str) -> float | None:
        """Row-weighted mean over every head."""
        pairs = [(m, n) for mr, nr in zip(self.means.get(stat, []), self.rows) for m, n in zip(mr, nr)
                 if m is not None and n]
        total = sum(n for _, n in pairs)
        return sum(m * n for m, n in pairs) / total if total else None

    def extremes(self, stat: str, k: int = 3) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
        """The k lowest and k highest heads by their mean: (layer, head, mean)."""
        cells = sorted((m, layer, head) for layer, row in enumerate(self.means.get(stat, []))
                       for head, m in enumerate(row) if m is not None)
        low = [(l, h, m) for m, l, h in cells[:k]]
        high = [(l, h, m) for m, l, h in reversed(cells[-k:])] if cells else []
        return low, high


@dataclass(frozen=True)
class ServerView:
    """Differences between two scrapes; None where the server lacks the family."""

    histograms: dict[str, Histogram | None]
    counters: dict[str, float | None]
    success_by_reason: dict[str, float]
    gauges_after: dict[str, float | None]
    heads: HeadView | None = None  # None: the server exports no per-head families


def parse(text: str) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    return Snapshot.of(text_string_to_metric_families(text))


def server_view(before: Snapshot, after: Snapshot, kind: str = "headwise") -> ServerView:
    success = family(COUNTERS["request_success"], kind)
    reasons = after.label_values(success, "finished_reason")
    return ServerView(
        histograms={k: histogram_delta(before, after, family(f, kind)) for k, f in HISTOGRAMS.items()},
        counters={k: counter_delta(before, after, family(n, kind)) for k, n in COUNTERS.items()},
        success_by_reason={r: d for r in sorted(reasons)
                           if (d := counter_delta(before, after, success, {"finished_reason": r}))},
        gauges_after={k: after.total(family(n, kind)) for k, n in GAUGES.items()},
        heads=head_view(before, after),
    )


def _per_head(snap: Snapshot, sample: str) -> dict[tuple[int, int], float]:
    """(layer, head) -> value of a per-head sample, summed over other labels (model)."""
    out: dict[tuple[int, int], float] = {}
    for (name, labels), value in snap.samples.items():
        if name != sample:
            continue
        d = dict(labels)
        try:
            key = (int(d["layer"]), int(d["head"]))
        except (KeyError, ValueError):
            continue
        out[key] = out.get(key, 0.0) + value
    return out


def head_view(before: Snapshot, after: Snapshot) -> HeadView | None:
    """The run's per-(layer, head) rows and means, from the summaries' _sum and _count
    differences; None when the server exports no per-head family."""
    counts = _per_head(after, HEAD_FAMILIES["entropy"] + "_count")
    if not counts:
        return None
    old_counts = _per_head(before, HEAD_FAMILIES["entropy"] + "_count")
    layers = 1 + max(l for l, _ in counts)
    heads = 1 + max(h for _, h in counts)
    rows = [[int(round(counts.get((l, h), 0.0) - old_counts.get((l, h), 0.0))) for h in range(heads)]
            for l in range(layers)]
    means: dict[str, list[list[float | None]]] = {}
    for stat, name in HEAD_FAMILIES.items():
        new_sum, old_sum = _per_head(after, name + "_sum"), _per_head(before, name + "_sum")
        new_n, old_n = _per_head(after, name + "_count"), _per_head(before, name + "_count")
        grid: list[list[float | None]] = []
        for l in range(layers):
            row: list[float | None] = []
            for h in range(heads):
                n = new_n.get((l, h), 0.0) - old_n.get((l, h), 0.0)
                row.append((new_sum.get((l, h), 0.0) - old_sum.get((l, h), 0.0)) / n if n > 0 else None)
            grid.append(row)
        means[stat] = grid
    return HeadView(layers=layers, heads=heads, rows=rows, means=means, telemetry_up=after.total(TELEMETRY_UP))


def head_view_from_telemetry(before: Mapping, after: Mapping) -> HeadView | None:
    """The same view from two GET /v1/telemetry?window=all answers of vLLM's headwise plugin (window "all":
    per-head counts and means since start; sums are mean x count). For vLLM with several API
    server processes, whose /metrics leaves the per-head families out."""
    try:
        new, old = after["heads"], before["heads"]
        counts, old_counts = new["counts"], old["counts"]
        layers, heads = len(counts), len(counts[0]) if counts else 0
        rows = [[int(counts[l][h]) - int(old_counts[l][h]) for h in range(heads)] for l in range(layers)]
        means: dict[str, list[list[float | None]]] = {}
        for stat in HEAD_FAMILIES:
            grid = []
            for l in range(layers):
                row: list[float | None] = []
                for h in range(heads):
                    m1, m0 = new[stat][l][h], old[stat][l][h]
                    s1 = 0.0 if m1 is None else float(m1) * int(counts[l][h])
                    s0 = 0.0 if m0 is None else float(m0) * int(old_counts[l][h])
                    row.append((s1 - s0) / rows[l][h] if rows[l][h] > 0 else None)
                grid.append(row)
            means[stat] = grid
        plugin = after.get("plugin") or {}
        up = None if "up" not in plugin else (1.0 if plugin["up"] else 0.0)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not layers or not heads:
        return None
    return HeadView(layers=layers, heads=heads, rows=rows, means=means, telemetry_up=up)


async def telemetry(client, base_url: str, headers: Mapping[str, str]) -> dict | None:
    """GET /v1/telemetry?window=all (the vLLM plugin's per-head view since start); None when absent."""
    try:
        r = await client.get(base_url.rstrip("/") + "/v1/telemetry?window=all&recent=0", headers=dict(headers),
                             timeout=10)
        data = r.json() if r.status_code == 200 else None
    except Exception:  # no such route, not JSON: no per-head view from here
        return None
    return data if isinstance(data, dict) and isinstance(data.get("heads"), dict) else None


async def scrape(client, base_url: str, headers: Mapping[str, str]) -> Snapshot | None:
    """GET /metrics; None when the server has none or it does not parse."""
    try:
        r = await client.get(base_url.rstrip("/") + "/metrics", headers=dict(headers), timeout=10)
        return parse(r.text) if r.status_code == 200 else None
    except Exception:  # an unreachable or unparsable /metrics only loses the server's view
        return None
