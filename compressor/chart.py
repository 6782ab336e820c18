"""The recipe search as a picture: size vs accuracy vs latency of every candidate, the chosen one marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_runtime.core.errors import UsageError

__all__ = ["write_search_chart"]


def _quality(row: dict[str, Any]) -> tuple[float, str]:
    """The y value of a candidate: task accuracy, else top-1 agreement, else output cosine."""
    for key, label in (
        ("accuracy", "accuracy (%)"),
        ("top1_agreement", "top-1 agreement with the original (%)"),
    ):
        if row.get(key) is not None:
            return 100.0 * float(row[key]), label
    return float(row["cosine"]), "output cosine vs the original"


def write_search_chart(report: dict[str, Any], path: Path) -> Path:
    """Write a PNG scatter of the search's candidates (x: bytes, y: quality, size: latency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--chart needs matplotlib: pip install 'edge-runtime[compressor]'") from exc
    rows = [row for row in report.get("search", {}).get("candidates", []) if "bytes" in row]
    if not rows:
        raise UsageError("the report has no recipe-search candidates to chart (use --search)")
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    original = report["original"]
    for row in rows:
        quality, label = _quality(row)
        color = "tab:green" if row["budgets_met"] else "tab:red"
        axes.scatter(
            row["bytes"] / 1024,
            quality,
            s=60 + 240 * float(row["latency_ratio"]),
            color=color,
            alpha=0.6,
            edgecolors="black",
            marker="*" if row.get("chosen") else "o",
        )
        axes.annotate(
            f"{row['recipe']}\n{row['latency_ratio']:.2f}x latency",
            (row["bytes"] / 1024, quality),
            textcoords="offset points",
            xytext=(8, 4),
            fontsize=7,
        )
    if original.get("accuracy") is not None and label.startswith("accuracy"):
        axes.axhline(100.0 * original["accuracy"], color="gray", linestyle="--", linewidth=1)
        axes.text(axes.get_xlim()[0], 100.0 * original["accuracy"], " fp32 original", fontsize=7, va="bottom")
    axes.set_xscale("log")
    axes.set_xlabel("artifact size (KiB, log scale)")
    axes.set_ylabel(label)
    axes.set_title(
        f"{report['model']} for {report['profile']['name']}: green meets every budget, "
        f"star = chosen,\nmarker area grows with latency vs the fp32 original",
        fontsize=9,
    )
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
