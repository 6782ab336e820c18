"""Signed bundles: round trip, and refusal of tampered, unsigned, wrong-key and non-bundle files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.artifact.bundle import read_bundle
from edge_runtime.artifact.golden import GoldenCase, pack_golden, unpack_golden
from edge_runtime.cli import cli
from edge_runtime.core.errors import BundleError, SignatureError, UsageError
from tests.conftest import make_keys


def _rewrite(source: Path, target: Path, change: dict[str, bytes | None]) -> Path:
    """Copy a bundle, replacing (bytes) or dropping (None) members."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if info.filename in change:
                if change[info.filename] is not None:
                    new.writestr(info.filename, change[info.filename])
            else:
                new.writestr(info.filename, old.read(info))
    return target


def test_round_trip_keeps_manifest_members_and_golden(mlp_bundle_factory, signing_keys) -> None:
    path = mlp_bundle_factory(name="digits", version="3")
    bundle = read_bundle(path, signing_keys.public_key)
    assert bundle.manifest.name == "digits" and bundle.manifest.version == "3"
    assert bundle.signed_by == bundle.manifest.signer
    assert set(bundle.manifest.files) == {"model.onnx", "golden.npz"}
    cases = bundle.golden_cases()
    assert len(cases) == 3 and cases[-1].inputs["input"].shape == (3, 64)


def test_tampered_member_is_refused(mlp_bundle_factory, signing_keys, tmp_path: Path) -> None:
    path = mlp_bundle_factory()
    with zipfile.ZipFile(path) as archive:
        model = bytearray(archive.read("model.onnx"))
    model[-5] ^= 0xFF
    bad = _rewrite(path, tmp_path / "tampered.edgebundle", {"model.onnx": bytes(model)})
    with pytest.raises(BundleError, match=r"'model\.onnx' does not match its sha256"):
        read_bundle(bad, signing_keys.public_key)


def test_edited_manifest_fails_the_signature(mlp_bundle_factory, signing_keys, tmp_path: Path) -> None:
    path = mlp_bundle_factory(version="1")
    with zipfile.ZipFile(path) as archive:
        manifest = archive.read("manifest.json").replace(b'"version": "1"', b'"version": "9"')
    bad = _rewrite(path, tmp_path / "edited.edgebundle", {"manifest.json": manifest})
    with pytest.raises(SignatureError, match="does not verify"):
        read_bundle(bad, signing_keys.public_key)


def test_wrong_key_and_unsigned_are_refused(mlp_bundle_factory, tmp_path: Path) -> None:
    path = mlp_bundle_factory()
    other = make_keys(tmp_path / "other")
    with pytest.raises(SignatureError, match="signed by another key"):
        read_bundle(path, other.public_key)
    unsigned = _rewrite(path, tmp_path / "unsigned.edgebundle", {"manifest.sig": None})
    with pytest.raises(SignatureError, match="unsigned"):
        read_bundle(unsigned, other.public_key)


def test_extra_member_and_non_bundles_are_refused(mlp_bundle_factory, signing_keys, tmp_path: Path) -> None:
    path = mlp_bundle_factory()
    extra = _rewrite(path, tmp_path / "extra.edgebundle", {})
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("payload.sh", b"echo hi")
    with pytest.raises(BundleError, match=r"'payload\.sh' is not listed"):
        read_bundle(extra, signing_keys.public_key)
    not_zip = tmp_path / "model.edgebundle"
    not_zip.write_bytes(b"\x08\x01 not a zip")
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(not_zip, signing_keys.public_key)
    truncated = tmp_path / "truncated.edgebundle"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BundleError):
        read_bundle(truncated, signing_keys.public_key)
    with pytest.raises(UsageError, match="no such file"):
        read_bundle(tmp_path / "missing.edgebundle", signing_keys.public_key)


def test_cli_verify_inspect_and_keygen(mlp_bundle_factory, signing_keys, tmp_path: Path) -> None:
    path = mlp_bundle_factory(name="mlp", version="2")
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(path), "--key", str(signing_keys.public_path)])
    assert ok.exit_code == 0, ok.output
    assert "signature OK" in ok.output and "self-test passed (3 golden cases)" in ok.output
    shown = runner.invoke(cli, ["inspect", str(path)])
    assert (
        shown.exit_code == 0 and "mlp version 2" in shown.output and "input  input: float32" in shown.output
    )
    keys = runner.invoke(cli, ["keygen", "-o", str(tmp_path / "k"), "--name", "fleet"])
    assert keys.exit_code == 0 and (tmp_path / "k" / "fleet.key").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(cli, ["keygen", "-o", str(tmp_path / "k"), "--name", "fleet"])
    assert again.exit_code == 2 and "already exists" in again.output
    wrong = runner.invoke(cli, ["verify", str(path), "--key", str(tmp_path / "k" / "fleet.pub")])
    assert wrong.exit_code == 1
    assert wrong.output.count("\n") == 1 and wrong.output.startswith("error: signature does not verify")
    assert "Traceback" not in wrong.output


def test_golden_cases_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    cases = [
        GoldenCase({"x": rng.normal(size=(n, 4)).astype(np.float32)}, {"y/probs": rng.random((n, 3))})
        for n in (1, 2, 5)
    ]
    back = unpack_golden(pack_golden(cases))
    assert len(back) == 3
    for original, restored in zip(cases, back, strict=True):
        np.testing.assert_array_equal(original.inputs["x"], restored.inputs["x"])
        np.testing.assert_array_equal(original.outputs["y/probs"], restored.outputs["y/probs"])
        assert restored.outputs["y/probs"].dtype == np.float64
