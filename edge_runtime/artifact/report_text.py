"""The compression report (stored in every manifest) as text tables for the terminal."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value * 100:.2f}%"
    if kind == "ratio":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    line = lambda cells: "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def _worst_task(fidelity: dict[str, Any]) -> str:
    """The lowest task-metric score of a candidate, with the metric's name."""
    tasks = fidelity.get("tasks") or []
    if not tasks:
        return "-"
    worst = min(tasks, key=lambda task: task["value"])
    return f"{worst['value']:.4f} {worst['metric']}"


def _task_table(fidelity: dict[str, Any]) -> list[str]:
    """One row per output: its task, the metric that judges it, and the measured value."""
    tasks = fidelity.get("tasks") or []
    if not tasks:
        return []
    rows = []
    for task in tasks:
        extra = [f"{k} {task[k]:.4g}" for k in ("cer", "max_abs_error") if k in task]
        extra += [
            f"{int(task[k])} {k.split('_')[0]}"
            for k in ("reference_detections", "candidate_detections")
            if k in task
        ]
        rows.append(
            [
                task["output"],
                task["task"] + (" (guessed)" if task.get("guessed") else ""),
                task["metric"],
                f"{task['value']:.4f}",
                _fmt(task.get("reference")),
                _fmt(task.get("min_score")),
                ", ".join(extra) or "-",
            ]
        )
    header = ["output", "task", "metric", "value", "original", "minimum", "also"]
    return ["task metrics (compressed vs original, on the report split):", _table(header, rows)]


def format_report(report: dict[str, Any]) -> str:
    """Summary table (original vs compressed) plus the int8 candidates that were measured."""
    original, compressed = report["original"], report["compressed"]
    fid = compressed["fidelity"]
    rows = [
        [
            "original (fp32)",
            str(original["bytes"]),
            "1.00x",
            f"{original['latency_ms']:.3f}",
            "1.00x",
            _fmt(original.get("accuracy"), "pct"),
            "-",
            "-",
        ],
        [
            "compressed",
            str(compressed["bytes"]),
            _fmt(compressed["size_ratio"], "ratio"),
            f"{compressed['latency_ms']:.3f}",
            _fmt(compressed["latency_ratio"], "ratio"),
            _fmt(fid["accuracy"], "pct"),
            _fmt(fid["top1_agreement"], "pct"),
            f"{fid['cosine']:.4f}",
        ],
    ]
    header = ["model", "bytes", "smaller", "latency ms", "vs fp32", "accuracy", "top-1 agree", "cosine"]
    parts = [
        f"{report['model']} for profile {report['profile']['name']} "
        f"(measured on {report['host']['cpu']}, {report['validation_samples']} held-out samples)",
        _table(header, rows),
        *_task_table(fid),
    ]
    weights = compressed.get("weights")
    if weights:
        shares = sorted(weights.items(), key=lambda item: -item[1]["share"])
        parts.append(
            "weights stored as: "
            + ", ".join(
                f"{name} {entry['share'] * 100:.1f}% ({int(entry['elements'])} values, {int(entry['bytes'])} bytes)"
                for name, entry in shares
            )
        )
    splits = report.get("splits")
    if splits:
        parts.append(
            f"samples: {splits['calibration']} calibration, {splits['selection']} selection (every choice), "
            f"{splits['report']} report (these numbers; no choice saw them)"
        )
    parts += [f"warning: {warning}" for warning in report.get("warnings", [])]
    for step in report["passes"]:
        if step.get("candidates"):
            cand_rows = [
                [
                    c["label"],
                    str(c["int8_compute_nodes"]),
                    str(c["bytes"]),
                    _fmt(c["latency_ratio"], "ratio"),
                    _fmt(c["accuracy"], "pct"),
                    _fmt(c["top1_agreement"], "pct"),
                    f"{c['cosine']:.4f}",
                    _worst_task(c),
                ]
                for c in step["candidates"]
            ]
            parts.append("int8 candidates (latency relative to the float model):")
            parts.append(
                _table(
                    [
                        "candidate",
                        "int8 nodes",
                        "bytes",
                        "latency",
                        "accuracy",
                        "top-1 agree",
                        "cosine",
                        "worst task",
                    ],
                    cand_rows,
                )
            )
            parts.append(f"chosen: {step['chosen']} - {step['decision']}")
        for note in step.get("notes", []):
            parts.append(f"note: {note}")
    search = report.get("search")
    if search:
        search_rows = [
            [
                ("* " if row.get("chosen") else "  ") + row["recipe"],
                str(row.get("bytes", "-")),
                _fmt(row.get("size_ratio"), "ratio"),
                _fmt(row.get("latency_ratio"), "ratio"),
                _fmt(row.get("accuracy"), "pct"),
                _fmt(row.get("top1_agreement"), "pct"),
                "yes"
                if row["budgets_met"]
                else "no: " + "; ".join(row.get("failures") or [row.get("error", "")]),
            ]
            for row in search["candidates"]
        ]
        parts.append("recipe search (* = chosen: the smallest within every budget):")
        parts.append(
            _table(
                ["recipe", "bytes", "smaller", "latency", "accuracy", "top-1 agree", "within budget"],
                search_rows,
            )
        )
    budgets = report.get("budgets", {})
    parts.append(
        "budgets: met"
        if budgets.get("met")
        else "budgets: NOT met: " + "; ".join(budgets.get("failures", []))
    )
    return "\n".join(parts)
