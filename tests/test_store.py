"""Model store: install verifies before copying, activate/rollback rewrite state.json atomically."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import pytest

from edge_runtime.artifact.bundle import read_bundle
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import BundleError, NotFoundError, SignatureError
from edge_runtime.state.store import ModelStore, check_compatible
from tests.conftest import make_keys


@pytest.fixture
def store(tmp_path, signing_keys, device_profile) -> ModelStore:
    return ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)


def test_install_copies_the_exact_bytes_and_does_not_activate(store, mlp_bundle_factory):
    path = mlp_bundle_factory("mlp", "1")
    manifest = store.install(path)
    stored = store.root / "mlp" / "1" / "bundle.edgebundle"
    assert (manifest.name, manifest.version) == ("mlp", "1")
    assert stored.read_bytes() == path.read_bytes()
    assert store.active() == {}
    assert store.versions("mlp") == ["1"]
    assert not list(stored.parent.glob(".*tmp"))  # no temp file left behind


def test_activate_and_rollback_write_versioned_state(store, mlp_bundle_factory):
    for version in ("1", "2"):
        store.install(mlp_bundle_factory("mlp", version))
    store.activate("mlp", "1")
    store.activate("mlp", "2")
    state_file = store.root / "mlp" / "state.json"
    assert json.loads(state_file.read_bytes()) == {"v": 1, "active": "2", "previous": "1"}
    assert store.active() == {"mlp": "2"}
    assert store.rollback("mlp") == "1"
    assert json.loads(state_file.read_bytes()) == {"v": 1, "active": "1", "previous": "2"}
    assert store.open("mlp", "1").manifest.version == "1"


def test_rollback_without_previous_and_activate_unknown_are_refused(store, mlp_bundle_factory):
    store.install(mlp_bundle_factory("mlp", "1"))
    store.activate("mlp", "1")
    with pytest.raises(NotFoundError, match="no previous version"):
        store.rollback("mlp")
    with pytest.raises(NotFoundError, match="not installed"):
        store.activate("mlp", "9")


def test_reinstall_same_bytes_is_idempotent_but_other_content_is_refused(store, mlp_bundle_factory):
    path = mlp_bundle_factory("mlp", "1")
    store.install(path)
    store.install(path)
    with pytest.raises(BundleError, match="immutable"):
        store.install(mlp_bundle_factory("mlp", "1", seed=7))


def _tampered(path, tmp_path):
    """A copy of the bundle whose model member was changed but whose manifest was not."""
    target = tmp_path / "tampered.edgebundle"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model.onnx":
                data = data[:-4] + b"\x00\x00\x00\x00"
            dst.writestr(info.filename, data)
    return target


def _unsigned(path, tmp_path):
    target = tmp_path / "unsigned.edgebundle"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            if info.filename != "manifest.sig":
                dst.writestr(info.filename, src.read(info))
    return target


def test_bad_bundles_are_refused_before_anything_is_copied(store, mlp_bundle_factory, tmp_path):
    good = mlp_bundle_factory("mlp", "1")
    other_keys = make_keys(tmp_path / "other")
    cases = [
        (_tampered(good, tmp_path), BundleError, "sha256"),
        (_unsigned(good, tmp_path), SignatureError, "unsigned"),
        (mlp_bundle_factory("mlp", "1", keys=other_keys), SignatureError, "does not verify"),
        (mlp_bundle_factory("mlp", "1", profile=load_profile("raspberry-pi-4")), BundleError, "arch"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            store.install(path)
    assert not (store.root / "mlp").exists()


def test_check_compatible_reasons(device_profile):
    base = read_manifest_for(device_profile)
    check_compatible(base, device_profile)
    avx2 = load_profile("x86-avx2-gateway")
    with pytest.raises(BundleError, match="fma"):
        check_compatible(dataclasses.replace(base, report={"profile": avx2.to_dict()}), device_profile)
    with pytest.raises(BundleError, match="engine"):
        check_compatible(dataclasses.replace(base, engine="tflite"), device_profile)
    no_details = dataclasses.replace(base, report={}, profile="x86-avx2-gateway")
    with pytest.raises(BundleError, match="built for profile 'x86-avx2-gateway'"):
        check_compatible(no_details, device_profile)
    check_compatible(dataclasses.replace(base, report={}), device_profile)
    # a bundle built for a subset of this CPU's features runs here
    subset = device_profile.to_dict()
    subset["hardware"]["cpu_features"] = ["avx2"]
    check_compatible(dataclasses.replace(base, report={"profile": subset}), device_profile)


def read_manifest_for(profile):
    from edge_runtime.artifact.manifest import Manifest
    from edge_runtime.core.types import TensorSpec

    return Manifest(
        name="m",
        version="1",
        profile=profile.name,
        engine="onnxruntime",
        model_file="model.onnx",
        inputs=(TensorSpec("x", "float32", (1,)),),
        outputs=(TensorSpec("y", "float32", (1,)),),
        files={},
        report={"profile": profile.to_dict()},
    )


def test_stored_bundle_tampered_on_disk_is_refused_on_open(store, mlp_bundle_factory, signing_keys):
    store.install(mlp_bundle_factory("mlp", "1"))
    stored = store.root / "mlp" / "1" / "bundle.edgebundle"
    read_bundle(stored, signing_keys.public_key)
    stored.write_bytes(stored.read_bytes()[:-10])
    with pytest.raises(BundleError):
        store.open("mlp", "1")


def test_corrupt_state_file_names_the_file(store, mlp_bundle_factory):
    store.install(mlp_bundle_factory("mlp", "1"))
    (store.root / "mlp" / "state.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"state\.json"):
        store.state("mlp")
    assert store.active() == {}
