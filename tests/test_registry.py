"""Registry: every active bundle verified, loaded and self-tested; failures refused, the rest serve."""

from __future__ import annotations

import threading
import zipfile

import numpy as np
import pytest

from edge_runtime.core.errors import ModelError, NotFoundError, UnavailableError
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from tests.broker import eventually
from tests.conftest import require_tflite
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward


@pytest.fixture
def store(tmp_path, signing_keys, device_profile) -> ModelStore:
    return ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)


@pytest.fixture
def registry(device_profile) -> ModelRegistry:
    return ModelRegistry(device_profile)


def install_active(store, path) -> None:
    manifest = store.install(path)
    store.activate(manifest.name, manifest.version)


def predict(registry, name, x, version=None):
    return registry.get(name, version).predict({INPUT_NAME: x})[OUTPUT_NAME]


def x_batch(n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)


def test_several_models_load_and_answer(store, registry, mlp_bundle_factory):
    install_active(store, mlp_bundle_factory("digits", "1", seed=1))
    install_active(store, mlp_bundle_factory("wide", "3", seed=2, sizes=(64, 48, 5)))
    assert registry.load_all(store) == []
    assert [(m.name, m.version) for m in registry.models()] == [("digits", "1"), ("wide", "3")]
    x = x_batch()
    np.testing.assert_allclose(
        predict(registry, "digits", x), reference_forward(make_weights(seed=1), x), atol=1e-5
    )
    wide = predict(registry, "wide", x, version="3")
    np.testing.assert_allclose(wide, reference_forward(make_weights(64, 48, 5, seed=2), x), atol=1e-5)
    assert registry.ready


def test_failing_self_test_is_refused_with_reason_and_others_keep_serving(
    store, registry, mlp_bundle_factory
):
    install_active(store, mlp_bundle_factory("good", "1"))
    install_active(
        store,
        mlp_bundle_factory("liar", "1", golden_outputs=lambda x: np.full((len(x), 10), 0.1, np.float32)),
    )
    failures = registry.load_all(store)
    assert [(f.name, f.version) for f in failures] == [("liar", "1")]
    assert "self-test failed" in failures[0].reason
    with pytest.raises(UnavailableError, match="self-test failed"):
        registry.get("liar")
    assert predict(registry, "good", x_batch()).shape == (2, 10)
    with pytest.raises(NotFoundError):
        registry.get("nobody")
    with pytest.raises(NotFoundError, match="version '7'"):
        registry.get("good", "7")


def test_bundle_tampered_in_the_store_is_refused_at_load(store, registry, mlp_bundle_factory):
    install_active(store, mlp_bundle_factory("good", "1"))
    install_active(store, mlp_bundle_factory("bad", "1"))
    stored = store.bundle_path("bad", "1")
    with zipfile.ZipFile(stored) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    members["model.onnx"] = members["model.onnx"].replace(b"Relu", b"Relx")
    with zipfile.ZipFile(stored, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    failures = registry.load_all(store)
    assert [f.name for f in failures] == ["bad"] and "sha256" in failures[0].reason
    assert predict(registry, "good", x_batch()).shape == (2, 10)


SERVED_DURING_SWAP = 20
"""Requests a swap waits to see served (between loading the new version and installing it)."""


def test_swap_keeps_serving_and_a_failing_new_version_leaves_the_old_one(
    store, registry, mlp_bundle_factory, monkeypatch
):
    install_active(store, mlp_bundle_factory("mlp", "1", seed=1))
    registry.load_all(store)
    store.install(mlp_bundle_factory("mlp", "2", seed=2))
    store.install(
        mlp_bundle_factory("mlp", "3", seed=3, golden_outputs=lambda x: np.zeros((len(x), 10), np.float32))
    )
    x = x_batch(1)
    expected = {v: reference_forward(make_weights(seed=int(v)), x) for v in ("1", "2")}
    stop = threading.Event()
    errors: list[BaseException] = []
    answers: list[str] = []  # the version that answered each request, in order

    def client() -> None:
        while not stop.is_set():
            try:
                model = registry.get("mlp")
                out = model.predict({INPUT_NAME: x})[OUTPUT_NAME]
                np.testing.assert_allclose(out, expected[model.version], atol=1e-5)
                answers.append(model.version)
            except BaseException as exc:  # any failure during the swap is a serving gap
                errors.append(exc)

    real_load = registry.load

    def load_while_serving(bundle):
        """Load the new version, then hold the swap open until requests were served meanwhile."""
        entered = len(answers)
        loaded = real_load(bundle)
        eventually(lambda: len(answers) >= entered + SERVED_DURING_SWAP or bool(errors), what="requests")
        return loaded

    monkeypatch.setattr(registry, "load", load_while_serving)

    def swap(version: str) -> list[str]:
        """Swap to `version` under load; the versions that answered while the swap ran."""
        before = len(answers)
        registry.swap("mlp", store.open("mlp", version))
        return answers[before : len(answers)]

    thread = threading.Thread(target=client)
    thread.start()
    try:
        eventually(lambda: len(answers) >= 1 or bool(errors), what="first answer")
        during_good = swap("2")
        eventually(lambda: answers[-1:] == ["2"] or bool(errors), what="an answer from version 2")
        with pytest.raises(ModelError, match="self-test failed"):
            swap("3")
        after_bad = len(answers)
        eventually(lambda: len(answers) >= after_bad + 5 or bool(errors), what="answers after the refusal")
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(during_good) >= SERVED_DURING_SWAP and during_good[0] == "1"
    assert set(during_good) <= {"1", "2"}, "only the old or the new version may answer during the swap"
    switch = answers.index("2")
    assert set(answers[:switch]) == {"1"} and set(answers[switch:]) == {"2"}, "the version changed once"
    assert set(answers[after_bad:]) == {"2"}, "a refused version never serves"
    assert registry.get("mlp").version == "2"
    np.testing.assert_allclose(predict(registry, "mlp", x), expected["2"], atol=1e-5)


def test_load_all_after_activate_picks_up_the_new_version(store, registry, mlp_bundle_factory):
    install_active(store, mlp_bundle_factory("mlp", "1", seed=1))
    registry.load_all(store)
    install_active(store, mlp_bundle_factory("mlp", "2", seed=2))
    assert registry.load_all(store) == []
    assert registry.get("mlp").version == "2"
    store.rollback("mlp")
    registry.load_all(store)
    assert registry.get("mlp").version == "1"


def test_tflite_bundle_loads_through_the_registry(tmp_path, signing_keys, mlp_bundle_factory):
    require_tflite()
    from edge_runtime.config.profiles import load_profile

    pi = load_profile("raspberry-pi-zero-2w")
    store = ModelStore(tmp_path / "pi-store", signing_keys.public_key, pi)
    install_active(store, mlp_bundle_factory("tiny", "1", engine="tflite", int8=True, profile=pi))
    registry = ModelRegistry(pi)
    assert registry.load_all(store) == []
    x = x_batch(4)
    out = predict(registry, "tiny", x)
    assert (out.argmax(-1) == reference_forward(make_weights(), x).argmax(-1)).mean() >= 0.75
