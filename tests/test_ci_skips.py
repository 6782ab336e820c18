"""In CI (`CI=true`) every kind of skip fails the run; outside CI a skip stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SKIPPING = """
import pytest

def test_runtime_skip():
    pytest.skip("runtime skip")

@pytest.mark.skip(reason="marker skip")
def test_marker_skip():
    pass

@pytest.mark.skipif(True, reason="skipif marker")
def test_skipif_marker():
    pass

def test_importorskip():
    pytest.importorskip("no_such_module_for_ci_test")

def test_passes():
    pass
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("no_such_module_at_import")

def test_never_collected():
    pass
"""


def _run_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """Run pytest in a subprocess on `folder`, with our conftest loaded as a plugin."""
    (folder / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("EDGE_REQUIRE_")}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    command += ["--rootdir", str(folder), "-c", str(folder / "pytest.ini"), str(folder)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_skips_stay_skips(tmp_path: Path, ci: str | None) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    result = _run_pytest(tmp_path, ci)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 4 skipped" in result.stdout


def test_in_ci_every_kind_of_skip_fails(tmp_path: Path) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    result = _run_pytest(tmp_path, "true")
    assert result.returncode == 1, result.stdout + result.stderr
    for name in ("test_runtime_skip", "test_marker_skip", "test_skipif_marker", "test_importorskip"):
        line = next(line for line in result.stdout.splitlines() if f"::{name} - " in line)
        assert "skipped in CI" in line, line
    assert "1 passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


def test_in_ci_a_module_level_skip_fails(tmp_path: Path) -> None:
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    result = _run_pytest(tmp_path, "true")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "skipped in CI" in result.stdout and "no_such_module_at_import" in result.stdout
