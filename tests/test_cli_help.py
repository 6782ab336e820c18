"""`edgectl --help` lists every command's short help without importing the compressor or onnx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edge_runtime.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent

RUNNER = """
import contextlib, io, json, sys
from edge_runtime.cli import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        cli(["--help"], prog_name="edgectl")
    except SystemExit as exc:
        code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"compressor", "onnx", "torch", "sklearn"})
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": heavy}))
"""


def test_help_lists_commands_without_importing_the_compressor() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["code"] == 0
    assert result["heavy"] == [], f"--help imported {result['heavy']}"
    lines = result["help"].splitlines()
    for name, (_, short_help) in COMMANDS.items():
        assert any(line.split() == [name, *short_help.split()] for line in lines), (name, result["help"])
