"""The runtime's folders are layers: every import of ours points down, never up or sideways.

Built from the imports themselves (module level, inside functions and under TYPE_CHECKING alike),
so a new module or a lazy import cannot quietly bend the arrows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "edge_runtime"

RANK = {
    "core": 0,
    "config": 1,
    "codecs": 1,
    "artifact": 2,
    "engines": 3,
    "state": 3,
    "serving": 4,
    "transports": 5,
    "update": 6,
    "telemetry": 6,
    "client": 6,
    "fleet": 7,
    "daemon": 7,
    "cli": 8,
}
"""A module may import our modules of a lower rank, and of its own layer; nothing else."""

ONLY_IN = {
    "paho": {"transports/mqtt/link.py"},
    "cryptography": {"artifact/signing.py", "fleet/certs.py"},
    "onnxruntime": {"engines/onnx.py"},
    "psycopg": {"fleet/store_postgres.py"},
    "ai_edge_litert": {"engines/tflite.py"},
    "tflite_runtime": {"engines/tflite.py"},
}
"""Third-party packages that one module alone may import (one boundary per dependency)."""

NEVER = {"compressor", "onnx", "torch", "tensorflow", "sklearn"}


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _layer(relative: Path) -> str | None:
    """The layer of a module path relative to edge_runtime/ (None: the package root's __init__)."""
    first = relative.parts[0]
    if first == "__init__.py":
        return None
    return first.removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(("edge_runtime", *path.relative_to(ROOT).parent.parts))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module == "edge_runtime":  # from edge_runtime import x: x is the module imported
                found += [(node.lineno, f"edge_runtime.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def test_every_module_sits_in_a_known_layer():
    layers = {_layer(path.relative_to(ROOT)) for path in _modules()} - {None}
    assert layers <= set(RANK), f"folders without a rank: {sorted(layers - set(RANK))}"
    assert {"core", "serving", "transports", "state"} <= layers


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    relative = path.relative_to(ROOT)
    layer = _layer(relative)
    wrong = []
    for line, module in _imports(path):
        parts = module.split(".")
        top = parts[0]
        if top == "edge_runtime":
            if len(parts) == 1 or parts[1] == "__version__":
                continue
            target = parts[1]
            if layer is None or target == layer:
                continue
            if RANK[target] >= RANK[layer]:
                wrong.append(
                    f"line {line}: {layer} (rank {RANK[layer]}) imports {module} (rank {RANK[target]})"
                )
        elif top in NEVER:
            wrong.append(f"line {line}: the device runtime imports {module}")
        elif top in ONLY_IN and str(relative) not in ONLY_IN[top]:
            wrong.append(f"line {line}: {top} may only be imported by {sorted(ONLY_IN[top])}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path: Path):
    """The rule above is not vacuous: an upward import in a core module is found."""
    probe = ROOT / "core" / "_probe_upward.py"
    probe.write_text("from edge_runtime.serving.registry import ModelRegistry\n", encoding="utf-8")
    try:
        with pytest.raises(AssertionError, match=r"core \(rank 0\) imports edge_runtime\.serving\.registry"):
            test_imports_point_down(probe)
    finally:
        probe.unlink()
