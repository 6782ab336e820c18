"""Zip bombs and lying zip headers: refused quickly and with bounded memory (peak RSS measured).

The bombs are built here, streaming, from zeros deflated at level 1 (a few MB that inflate to
GBs); a subprocess reads them and reports how much its peak RSS grew while doing so.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

from click.testing import CliRunner

from edge_runtime.cli import cli
from tests.test_bundle_hostile import members_of

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
RSS_GROWTH_LIMIT_MIB = 96
"""Reading every bomb below may grow the reader's peak RSS by at most this much."""

READER = r"""
import json, resource, sys
from edge_runtime.artifact.bundle import read_bundle
from edge_runtime.artifact.signing import load_public_key
from edge_runtime.core.errors import EdgeError
key = load_public_key(sys.argv[1])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
before = peak()
outcomes = []
for spec in sys.argv[2:]:
    path, keyed = spec.rsplit(":", 1)
    try:
        read_bundle(path, key if keyed == "key" else None)
        outcomes.append(["accepted", ""])
    except EdgeError as exc:
        outcomes.append([type(exc).__name__, str(exc)])
print(json.dumps({"before_mib": before, "after_mib": peak(), "outcomes": outcomes}))
"""


def zip_with_bomb(path: Path, members: list[tuple[str, bytes]], bomb: str, size: int, level: int = 1) -> Path:
    """A zip of `members` in which member `bomb` is replaced by `size` zero bytes, written streaming."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, data in members:
            if name != bomb:
                archive.writestr(name, data)
                continue
            with archive.open(name, "w", force_zip64=size > zipfile.ZIP64_LIMIT) as member:
                zeros = bytes(MIB)
                for _ in range(size // MIB):
                    member.write(zeros)
    return path


def lie_about_size(path: Path, member: str, claimed: int) -> None:
    """Patch `member`'s uncompressed size in its local header and central directory entry (no zip64)."""
    raw = bytearray(path.read_bytes())
    name = member.encode()
    local = raw.find(b"PK\x03\x04")
    while raw[local + 30 : local + 30 + len(name)] != name:
        local = raw.find(b"PK\x03\x04", local + 4)
    struct.pack_into("<I", raw, local + 22, claimed)
    central = raw.find(b"PK\x01\x02")
    while raw[central + 46 : central + 46 + len(name)] != name:
        central = raw.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", raw, central + 24, claimed)
    path.write_bytes(bytes(raw))


def test_zip_bombs_are_refused_with_bounded_memory(mlp_bundle_factory, signing_keys, tmp_path):
    genuine = mlp_bundle_factory()
    members = members_of(genuine)
    manifest = json.loads(dict(members)["manifest.json"])
    model_size = manifest["files"]["model.onnx"]["size"]
    manifest_bomb = zip_with_bomb(tmp_path / "manifest-bomb.edgebundle", members, "manifest.json", 1024 * MIB)
    model_bomb = zip_with_bomb(tmp_path / "model-bomb.edgebundle", members, "model.onnx", 2048 * MIB)
    liar = zip_with_bomb(tmp_path / "liar.edgebundle", members, "model.onnx", 64 * MIB)
    lie_about_size(liar, "model.onnx", model_size)
    # Read without a key (`edgectl inspect`), the manifest's sizes are the attacker's: it declares 1 GiB.
    unsigned = dict(members)
    declared = {
        **manifest,
        "files": {**manifest["files"], "model.onnx": {"sha256": "0" * 64, "size": 1024 * MIB}},
    }
    unsigned["manifest.json"] = json.dumps(declared).encode()
    ratio_bomb = zip_with_bomb(tmp_path / "ratio-bomb.edgebundle", list(unsigned.items()), "model.onnx",
                               256 * MIB, level=6)  # fmt: skip
    assert max(p.stat().st_size for p in (manifest_bomb, model_bomb, liar, ratio_bomb)) < 12 * MIB

    specs = [
        f"{manifest_bomb}:key",
        f"{model_bomb}:key",
        f"{liar}:key",
        f"{ratio_bomb}:none",
        f"{genuine}:key",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", READER, str(signing_keys.public_path), *specs],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    kinds = [kind for kind, _ in report["outcomes"]]
    messages = [message for _, message in report["outcomes"]]
    assert kinds == ["BundleError", "BundleError", "BundleError", "BundleError", "accepted"], messages
    assert f"'manifest.json' inflates beyond the {4 * MIB} bytes" in messages[0]
    assert f"'model.onnx' inflates beyond the {model_size} bytes" in messages[1]
    assert "model.onnx" in messages[2]  # the zip's own size check or our sha256 stops it
    assert "inflates more than 200x" in messages[3]
    growth = report["after_mib"] - report["before_mib"]
    assert growth < RSS_GROWTH_LIMIT_MIB, f"peak RSS grew by {growth} MiB reading the bombs"

    inspected = CliRunner().invoke(cli, ["inspect", str(ratio_bomb)])
    assert inspected.exit_code == 1 and inspected.output.startswith("error: ") and "200x" in inspected.output
    assert len(inspected.output.strip().splitlines()) == 1
