"""Recipe search: the profile's budgets choose the passes and their strength.

Each candidate recipe (int8 alone; magnitude pruning then int8; a distilled student of some width,
optionally channel-pruned, then int8) is run through the pipeline and measured against the
original model. The smallest artifact within every budget wins (latency breaks ties); when none
fits, the refusal names each budget the closest candidate missed, and by how much.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compressor.passes import REQUIRES, missing_modules
from compressor.pipeline import CompressionResult, compress, default_recipe, target_steps
from compressor.progress import Progress
from compressor.tasks import TaskConfig
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import BudgetError, CompressionError, ModelError, UsageError

__all__ = ["Recipe", "SearchOutcome", "candidate_recipes", "search_recipes"]


@dataclass(frozen=True)
class Recipe:
    """A named sequence of passes with their options."""

    name: str
    passes: tuple[str, ...]
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchOutcome:
    """The chosen result and one row per candidate tried (its numbers, or why it failed)."""

    chosen: CompressionResult
    rows: list[dict[str, Any]]


def _can_distill() -> bool:
    return not missing_modules(REQUIRES["distill"][0])


def candidate_recipes(
    profile: DeviceProfile, *, distill: bool | None = None, log: Callable[[str], Any] | None = None
) -> list[Recipe]:
    """The candidates the profile's compression settings allow (distillation only with PyTorch);
    `log` hears why a kind of candidate is left out."""
    spec = profile.compression
    if distill is None:
        distill = _can_distill()
        if not distill and spec.distill_widths and log is not None:
            missing = ", ".join(missing_modules(REQUIRES["distill"][0]))
            log(f"note: no distilled candidates: they need {missing} ({REQUIRES['distill'][1]})")
    base = default_recipe(profile)
    tail = target_steps(profile)
    if base[-len(tail) :] != tail:  # a profile recipe ending otherwise: its last pass is the target
        tail = base[-1:]
    prefix, final = base[: -len(tail)], tail[-1]
    recipes = [Recipe(final, base)]
    recipes += [
        Recipe(
            f"prune {sparsity:.0%} + {final}", (*prefix, "prune", *tail), {"prune": {"sparsity": sparsity}}
        )
        for sparsity in spec.sparsities
    ]
    if distill:
        for width in spec.distill_widths:
            options = {"width": width, "epochs": spec.distill_epochs}
            recipes.append(
                Recipe(f"distill w{width:g} + {final}", (*prefix, "distill", *tail), {"distill": options})
            )
            recipes += [
                Recipe(
                    f"distill w{width:g} + prune {ratio:.0%} channels + {final}",
                    (*prefix, "distill", "structured_prune", *tail),
                    {"distill": options, "structured_prune": {"ratio": ratio}},
                )
                for ratio in spec.prune_ratios
            ]
    return recipes


def _row(recipe: Recipe, result: CompressionResult | None, error: str = "") -> dict[str, Any]:
    """One line of the search table."""
    if result is None:
        return {"recipe": recipe.name, "passes": list(recipe.passes), "error": error, "budgets_met": False}
    compressed = result.report["compressed"]
    return {
        "recipe": recipe.name,
        "passes": list(recipe.passes),
        "bytes": compressed["bytes"],
        "deflated_bytes": compressed["deflated_bytes"],
        "size_ratio": compressed["size_ratio"],
        "latency_ratio": compressed["latency_ratio"],
        "accuracy": compressed["fidelity"]["accuracy"],
        "top1_agreement": compressed["fidelity"]["top1_agreement"],
        "cosine": compressed["fidelity"]["cosine"],
        "budgets_met": result.budgets_met,
        "failures": result.report["budgets"]["failures"],
    }


def search_recipes(
    model_path: Path,
    profile: DeviceProfile,
    calibration: Sequence[Mapping[str, np.ndarray]],
    *,
    validation: Sequence[Mapping[str, np.ndarray]],
    labels: np.ndarray | None = None,
    tasks: TaskConfig | None = None,
    recipes: Sequence[Recipe] | None = None,
    workdir: Path | None = None,
    log: Callable[[str], Any] = print,
    seed: int = 0,
) -> SearchOutcome:
    """Run every candidate recipe, keep the smallest within budget; BudgetError when none is."""
    rows: list[dict[str, Any]] = []
    results: list[tuple[int, CompressionResult]] = []
    candidates = list(recipes or candidate_recipes(profile))
    progress = Progress(len(candidates), log)
    for recipe in candidates:
        progress.step(f"recipe: {recipe.name}")
        try:
            result = compress(
                model_path,
                profile,
                calibration,
                validation=validation,
                labels=labels,
                tasks=tasks,
                workdir=workdir,
                recipe=recipe.passes,
                pass_options=recipe.options,
                log=log,
                seed=seed,
                enforce_budgets=False,
                show_progress=False,
            )
        except (CompressionError, ModelError, UsageError) as exc:
            log(f"  dropped {recipe.name}: cannot be built: {exc}")
            rows.append(_row(recipe, None, str(exc)))
            continue
        rows.append(_row(recipe, result))
        results.append((len(rows) - 1, result))
        if result.budgets_met:
            log(f"  {recipe.name}: within every budget ({result.report['compressed']['bytes']} bytes)")
        else:
            log(f"  dropped {recipe.name}: {'; '.join(result.report['budgets']['failures'])}")
    fitting = [(i, r) for i, r in results if r.budgets_met]
    if not fitting:
        raise BudgetError(_refusal(profile, rows))
    index, chosen = min(
        fitting,
        key=lambda item: (
            item[1].report["compressed"]["bytes"],
            item[1].report["compressed"]["latency_ratio"],
        ),
    )
    for position, row in enumerate(rows):
        row["chosen"] = position == index
    chosen.report["search"] = {"chosen": rows[index]["recipe"], "candidates": rows}
    return SearchOutcome(chosen=chosen, rows=rows)


def _refusal(profile: DeviceProfile, rows: list[dict[str, Any]]) -> str:
    """Which budget each measured candidate missed, and by how much."""
    measured = [row for row in rows if "failures" in row]
    if not measured:
        reasons = "; ".join(f"{row['recipe']}: {row['error']}" for row in rows)
        return f"no candidate recipe could be built for profile '{profile.name}': {reasons}"
    parts = [f"{row['recipe']}: {'; '.join(row['failures'])}" for row in measured]
    return f"no candidate recipe meets profile '{profile.name}' budgets: " + " | ".join(parts)
