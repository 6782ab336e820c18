"""One bad file refuses one model: every exception from one model's load is a refusal with a
reason, the others serve; reload swaps in new versions and unloads inactive ones."""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

import numpy as np
import pytest

from edge_runtime.artifact.bundle import Bundle
from edge_runtime.core.errors import NotFoundError, UnavailableError
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelState, ModelStore
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward
from tests.test_bundle_bomb import zip_with_bomb
from tests.test_bundle_hostile import deep, members_of, replaced, write_zip

MIB = 1 << 20


def plant(store: ModelStore, name: str, version: str, bundle_file) -> None:
    """Put a file where an installed bundle lives and make it active (as a hostile SD card would)."""
    target = store.bundle_path(name, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle_file, target)
    (target.parent.parent / "state.json").write_bytes(ModelState(active=version).to_json())


def hostile_store(store: ModelStore, factory, tmp_path) -> dict[str, str]:
    """Fill `store` with one hostile model per defect; returns model -> a fragment of its refusal."""
    members = members_of(factory("x", "1"))
    manifest = json.loads(dict(members)["manifest.json"])
    ab = json.dumps({**manifest, "report": "ab"}).encode()
    planted = {
        "reportab": (write_zip(tmp_path / "ab.zip", replaced(members, manifest_json=ab, manifest_sig=None)),
                     "unsigned"),
        "nested": (write_zip(tmp_path / "n.zip", replaced(members, manifest_json=deep(50_000).encode(),
                                                          manifest_sig=None)), "unsigned"),
        "dup": (write_zip(tmp_path / "d.zip", [*members, ("model.onnx", dict(members)["model.onnx"])]),
                "appears twice"),
        "bomb": (zip_with_bomb(tmp_path / "b.zip", members, "model.onnx", 256 * MIB), "inflates beyond"),
        "notzip": (tmp_path / "garbage", "not a bundle"),
    }  # fmt: skip
    (tmp_path / "garbage").write_bytes(b"\0" * 100)
    for name, (path, _) in planted.items():
        plant(store, name, "1", path)
    wrong = store.install(factory("state123", "1"))
    (store.root / wrong.name / "state.json").write_bytes(b'{"v": 1, "active": 123}')
    store.install(factory("deepstate", "1"))
    (store.root / "deepstate" / "state.json").write_bytes(b'{"v": 1, "active": ' + b"[" * 50_000 + b"}")
    return {name: fragment for name, (_, fragment) in planted.items()} | {
        "state123": "'active' must be a version name or null, not 'int'",
        "deepstate": "deeper than 64",
    }


class FaultyStore(ModelStore):
    """A store whose `open` fails for some models the way a device can (memory, I/O, a bug)."""

    faults: ClassVar[dict[str, BaseException]] = {"oom": MemoryError("cannot allocate"), "eio": OSError(5, "Input/output error"),
              "bug": RuntimeError("unexpected")}  # fmt: skip

    def open(self, name: str, version: str) -> Bundle:
        if name in self.faults:
            raise self.faults[name]
        return super().open(name, version)


def test_load_all_refuses_each_hostile_model_and_serves_the_good_one(
    tmp_path, signing_keys, device_profile, mlp_bundle_factory
):
    store = FaultyStore(tmp_path / "store", signing_keys.public_key, device_profile)
    for name in ("good", *FaultyStore.faults):
        store.activate(name, store.install(mlp_bundle_factory(name, "1", seed=1)).version)
    expected = hostile_store(store, mlp_bundle_factory, tmp_path)
    expected |= {"oom": "MemoryError: cannot allocate", "eio": "OSError: [Errno 5]", "bug": "RuntimeError"}
    registry = ModelRegistry(device_profile)
    failures = {failure.name: failure.reason for failure in registry.load_all(store)}
    assert sorted(failures) == sorted(expected)
    for name, fragment in expected.items():
        assert fragment in failures[name], (name, failures[name])
        with pytest.raises(UnavailableError):
            registry.get(name)
    x = np.ones((1, 64), np.float32)
    out = registry.get("good").predict({INPUT_NAME: x})[OUTPUT_NAME]
    np.testing.assert_allclose(out, reference_forward(make_weights(seed=1), x), atol=1e-5)
    assert registry.ready and [m.name for m in registry.models()] == ["good"]


def test_reload_swaps_unloads_and_keeps_the_old_version_on_failure(
    tmp_path, signing_keys, device_profile, mlp_bundle_factory
):
    store = ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)
    for name, version, seed in (("a", "1", 1), ("a", "2", 2), ("b", "1", 3)):
        store.install(mlp_bundle_factory(name, version, seed=seed))
    store.activate("a", "1")
    store.activate("b", "1")
    registry = ModelRegistry(device_profile)
    assert registry.load_all(store) == []
    held = registry.get("a")  # a request in flight holds the old model
    store.activate("a", "2")
    store.write_state("b", ModelState(active=None, previous="1"))
    report = registry.reload(store)
    assert report.loaded == (("a", "2"),) and report.unloaded == (("b", "1"),) and report.refused == ()
    assert report.summary() == "loaded a 2; unloaded b 1 (0 unchanged)"
    with pytest.raises(NotFoundError):
        registry.get("b")
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(held.predict({INPUT_NAME: x})[OUTPUT_NAME],
                               reference_forward(make_weights(seed=1), x), atol=1e-5)  # fmt: skip
    # A new active version that fails its self-test leaves the serving one in place.
    liar = mlp_bundle_factory("a", "3", golden_outputs=lambda v: np.zeros((len(v), 10), np.float32))
    store.activate("a", store.install(liar).version)
    report = registry.reload(store)
    assert [(f.name, f.version) for f in report.refused] == [("a", "3")]
    assert "self-test failed" in report.refused[0].reason
    assert registry.get("a").version == "2" and registry.failures() == []
    # A state.json broken after load: the model keeps serving what it had, the refusal is reported.
    (store.root / "a" / "state.json").write_bytes(b'{"v": 1, "active": 5}')
    report = registry.reload(store)
    assert [f.name for f in report.refused] == ["a"] and registry.get("a").version == "2"
    assert registry.reload(store).unchanged == ()
