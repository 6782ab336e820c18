"""A TOML recipe: the passes, how each output is judged, a metric of one's own, pass options.

passes = ["prepare", "int8"]          # optional: the profile's recipe otherwise
metric = "mymetrics:line_accuracy"    # optional: module:function(reference, candidate, labels)
metric_min = 0.97                     # optional: its budget (default: the profile's pp budget)

[tasks.logits]                        # one table per output; unnamed outputs are guessed
kind = "ctc"                          # classes | ctc | detection | boxes | embedding | decision | regression
min_score = 0.98                      # optional budget on this output's task metric
blank = 0                             # ctc only; detection: score_threshold, iou; boxes: map_threshold

[options.int8]                        # keyword options of a pass
calibrate_method = "Percentile"
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.tasks import TaskConfig, TaskKind, TaskSpec, load_metric
from edge_runtime.core.errors import UsageError

__all__ = ["RecipeFile", "load_recipe_file"]

_TOP_KEYS = ("passes", "metric", "metric_min", "tasks", "options")


@dataclass(frozen=True)
class RecipeFile:
    """What a TOML recipe asks for."""

    passes: tuple[str, ...] | None
    tasks: TaskConfig
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _number(value: Any, where: str, kind: type) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
    ):
        raise UsageError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _task_spec(table: Any, where: str) -> TaskSpec:
    """One `[tasks.NAME]` table (or a bare kind string) as a TaskSpec."""
    if isinstance(table, str):
        table = {"kind": table}
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table or a task kind, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(fields)})")
    known = ", ".join(kind.value for kind in TaskKind)
    if table.get("kind") not in {kind.value for kind in TaskKind}:
        raise UsageError(f"{where}.kind must be one of {known}, got {table.get('kind')!r}")
    values: dict[str, Any] = {"kind": TaskKind(table["kind"])}
    for name in ("min_score", "score_threshold", "iou", "margin"):
        if name in table:
            values[name] = _number(table[name], f"{where}.{name}", float)
    if "blank" in table:
        values["blank"] = _number(table["blank"], f"{where}.blank", int)
    return TaskSpec(**values)


def load_recipe_file(path: Path) -> RecipeFile:
    """Read and check a TOML recipe; every mistake is a UsageError naming the file and key."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"recipe {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key '{unknown[0]}' (allowed: {', '.join(_TOP_KEYS)})")
    passes = data.get("passes")
    if passes is not None and (not isinstance(passes, list) or not all(isinstance(p, str) for p in passes)):
        raise UsageError(f"{path}: passes must be a list of pass names, got {passes!r}")
    tasks = data.get("tasks", {})
    options = data.get("options", {})
    if not isinstance(tasks, dict) or not isinstance(options, dict):
        raise UsageError(f"{path}: tasks and options must be tables")
    if not all(isinstance(value, dict) for value in options.values()):
        raise UsageError(f"{path}: each [options.PASS] must be a table of keyword options")
    specs = {name: _task_spec(table, f"{path}: tasks.{name}") for name, table in tasks.items()}
    metric = None
    if "metric" in data:
        minimum = data.get("metric_min")
        metric = load_metric(
            str(data["metric"]), None if minimum is None else _number(minimum, f"{path}: metric_min", float)
        )
    return RecipeFile(
        passes=tuple(passes) if passes is not None else None,
        tasks=TaskConfig(specs=specs, metric=metric),
        options=options,
    )
