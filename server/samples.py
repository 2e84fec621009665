"""Prometheus samples of one scrape (or one collect of a registry), and differences of two.

Shared by the load-test client, which parses a server's /metrics text before and after a run
(loadtests/server_metrics.py), and the vLLM plugin's telemetry feed, which collects vLLM's own
metrics from its registry every few seconds (server/vllm_plugin/vllm_metrics.py). Families are
summed over their label sets (model, engine, ...), le aside: one server, one model.

Pure Python over prometheus_client's Metric objects (anything with .samples of name, labels and
value); nothing is registered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server.latency import Histogram

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Snapshot:
    """Every sample of one scrape: (sample name, sorted labels) -> value."""

    samples: Mapping[tuple[str, Labels], float]

    @classmethod
    def of(cls, families: Iterable) -> Snapshot:
        """From metric families (a text parser's, or a registry's collect())."""
        return cls({(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples})

    def _values(self, name: str, where: Mapping[str, str] | None) -> list[float]:
        return [v for (n, labels), v in self.samples.items()
                if n == name and all(dict(labels).get(k) == w for k, w in (where or {}).items())]

    def total(self, name: str, where: Mapping[str, str] | None = None) -> float | None:
        """Sum of a sample name over label sets (matching `where`); None if absent."""
        values = self._values(name, where)
        return sum(values) if values else None

    def largest(self, name: str) -> float | None:
        """Largest value of a sample name over its label sets; None if absent."""
        return max(self._values(name, None), default=None)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for (n, labels) in self.samples if n == name and label in dict(labels)}

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """label value -> the sample's total over the other labels."""
        return {value: self.total(name, {label: value}) or 0.0 for value in sorted(self.label_values(name, label))}


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


def subtract(new: Histogram, old: Histogram | None) -> Histogram:
    """The observations of `new` that `old` does not hold (`new` itself when the bounds differ)."""
    if old is None or old.bounds != new.bounds:
        return new
    return Histogram(bounds=new.bounds, cumulative=tuple(a - b for a, b in zip(new.cumulative, old.cumulative)),
                     sum=new.sum - old.sum, count=new.count - old.count)


def histogram_delta(before: Snapshot, after: Snapshot, family: str) -> Histogram | None:
    new = histogram_of(after, family)
    return None if new is None else subtract(new, histogram_of(before, family))


def counter_delta(before: Snapshot, after: Snapshot, name: str, where: Mapping[str, str] | None = None) -> float | None:
    new = after.total(name, where)
    return None if new is None else new - (before.total(name, where) or 0.0)
