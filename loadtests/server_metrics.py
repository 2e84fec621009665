"""headwise's own view of a run: /metrics read before and after, differenced.

Family names are DESIGN.md's (vLLM's semantics under the headwise_ prefix). A family the server
does not export yet is None here and "n/a" in the table. Only prometheus_client's text parser
is used; nothing is registered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from loadtests.stats import Histogram

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

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Snapshot:
    """Every sample of one scrape: (sample name, sorted labels) -> value."""

    samples: Mapping[tuple[str, Labels], float]

    def total(self, name: str, where: Mapping[str, str] | None = None) -> float | None:
        """Sum of a sample name over label sets (matching `where`); None if absent."""
        values = [v for (n, labels), v in self.samples.items()
                  if n == name and all(dict(labels).get(k) == w for k, w in (where or {}).items())]
        return sum(values) if values else None

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for (n, labels) in self.samples if n == name and label in dict(labels)}


@dataclass(frozen=True)
class ServerView:
    """Differences between two scrapes; None where the server lacks the family."""

    histograms: dict[str, Histogram | None]
    counters: dict[str, float | None]
    success_by_reason: dict[str, float]
    gauges_after: dict[str, float | None]


def parse(text: str) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Snapshot(samples)


def histogram_of(snap: Snapshot, family: str) -> Histogram | None:
    """A histogram family summed over its label sets (other than le)."""
    bucket = family + "_bucket"
    les = snap.label_values(bucket, "le")
    if not les:
        return None
    bounds = sorted(float(le) for le in les if not math.isinf(float(le)))
    by_le = {float(le): le for le in les}
    cumulative = [snap.total(bucket, {"le": by_le[b]}) or 0.0 for b in bounds]
    cumulative.append(snap.total(bucket, {"le": by_le.get(math.inf, "+Inf")}) or 0.0)
    return Histogram(bounds=tuple(bounds), cumulative=tuple(int(round(c)) for c in cumulative),
                     sum=snap.total(family + "_sum") or 0.0, count=int(round(snap.total(family + "_count") or 0)))


def histogram_delta(before: Snapshot, after: Snapshot, family: str) -> Histogram | None:
    new = histogram_of(after, family)
    if new is None:
        return None
    old = histogram_of(before, family)
    if old is None or old.bounds != new.bounds:
        return new
    return Histogram(bounds=new.bounds, cumulative=tuple(a - b for a, b in zip(new.cumulative, old.cumulative)),
                     sum=new.sum - old.sum, count=new.count - old.count)


def counter_delta(before: Snapshot, after: Snapshot, name: str, where: Mapping[str, str] | None = None) -> float | None:
    new = after.total(name, where)
    return None if new is None else new - (before.total(name, where) or 0.0)


def server_view(before: Snapshot, after: Snapshot) -> ServerView:
    success = COUNTERS["request_success"]
    reasons = after.label_values(success, "finished_reason")
    return ServerView(
        histograms={k: histogram_delta(before, after, f) for k, f in HISTOGRAMS.items()},
        counters={k: counter_delta(before, after, n) for k, n in COUNTERS.items()},
        success_by_reason={r: d for r in sorted(reasons)
                           if (d := counter_delta(before, after, success, {"finished_reason": r}))},
        gauges_after={k: after.total(n) for k, n in GAUGES.items()},
    )


async def scrape(client, base_url: str, headers: Mapping[str, str]) -> Snapshot | None:
    """GET /metrics; None when the server has none or it does not parse."""
    try:
        r = await client.get(base_url.rstrip("/") + "/metrics", headers=dict(headers), timeout=10)
        return parse(r.text) if r.status_code == 200 else None
    except Exception:  # an unreachable or unparsable /metrics only loses the server's view
        return None
