"""The PNG: latency percentiles against output-token throughput, one point per load level."""

from __future__ import annotations

from collections.abc import Sequence

from loadtests.report import PointResult

PANELS = (("ttft", "time to first token"), ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))
SERIES = ((50.0, "p50", "o-"), (90.0, "p90", "s--"), (99.0, "p99", "^:"))


def _short(point) -> str:
    if point.concurrency is not None and point.request_rate is None:
        return f"c={point.concurrency}"
    return f"{point.request_rate:g}/s" if point.request_rate is not None else "inf"


def write_png(results: Sequence[PointResult], path: str, title: str) -> None:
    """Save the plot to `path` (matplotlib, headless)."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    x = [r.summary.output_throughput for r in results]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2), constrained_layout=True)
    for ax, (key, name) in zip(axes, PANELS):
        for q, label, style in SERIES:
            y = [r.summary.latency[key].percentiles.get(q) for r in results]
            pts = [(a, b * 1000.0) for a, b in zip(x, y) if b is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for r, xi in zip(results, x):
            med = r.summary.latency[key].percentiles.get(50.0)
            if med is not None:
                ax.annotate(_short(r.run.point), (xi, med * 1000.0), textcoords="offset points", xytext=(4, -10),
                            fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
