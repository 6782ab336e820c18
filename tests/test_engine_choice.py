"""Engine choice by measurement (issue 14): a profile listing ONNX Runtime and OpenVINO gets each
candidate measured through each installed engine; the preferred engine stays unless another is
faster in every timing run; the bundle records the chosen engine and its options, and is served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from compressor.bundling import write_result_bundle
from compressor.engine_choice import MARGIN, EngineCandidate, _pick, installed_engines
from compressor.measure import Timing
from compressor.pipeline import compress
from edge_runtime.artifact.bundle import read_bundle
from edge_runtime.config.profiles import Engine, load_profile
from edge_runtime.engines import load_backend
from edge_runtime.engines.selftest import run_selftest
from tests.broker import broker_fixture, free_port, write_daemon_config  # noqa: F401 (fixture)
from tests.conftest import require_module
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, build_onnx_mlp, make_weights, reference_forward
from tests.test_backends_contract import OPENVINO_EXTRA
from tests.test_openvino_daemon import DEVICE, infer_http, infer_mqtt, install, serving

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = make_weights(64, 32, 10, seed=9)


def timing(per_run: list[list[float]]) -> Timing:
    return Timing(
        baseline_ms=1.0,
        median_ms=[float(np.median(r)) for r in per_run],
        ratios=[float(np.median(r)) for r in per_run],
        ranges=[(min(r), max(r)) for r in per_run],
        per_run=per_run,
    )


def test_preferred_engine_stays_unless_another_is_faster_in_every_run() -> None:
    candidates = [
        EngineCandidate(Engine.ONNXRUNTIME, "ours", b""),
        EngineCandidate(Engine.OPENVINO, "f32", b""),
    ]
    preferred = [1.0, 1.0, 1.0, 1.0, 1.0]
    noisy = [0.5, 0.5, 0.5, 0.5, 0.95]  # a faster median, but one run within the margin: noise
    assert _pick(candidates, timing([preferred, noisy]), [True, True]) == 0
    faster = [MARGIN - 0.05] * 5
    assert _pick(candidates, timing([preferred, faster]), [True, True]) == 1
    assert _pick(candidates, timing([preferred, faster]), [True, False]) == 0  # misses a budget
    three = [*candidates, EngineCandidate(Engine.OPENVINO, "nncf", b"")]
    assert _pick(three, timing([preferred, faster, [0.3] * 5]), [True, True, True]) == 2


def test_only_installed_engines_that_load_the_format_are_candidates() -> None:
    profile = load_profile("x86-vnni-gateway")
    onnx_engines = installed_engines(profile, "onnx")
    assert onnx_engines[0] is Engine.ONNXRUNTIME
    assert installed_engines(profile, "tflite") == []  # neither listed engine loads a .tflite


def _data(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{INPUT_NAME: rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(count)]


def _compress(tmp_path: Path) -> object:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(build_onnx_mlp(WEIGHTS))
    return compress(path, load_profile("x86-vnni-gateway"), _data(32, 1), validation=_data(32, 2),
                    log=lambda _line: None, show_progress=False)  # fmt: skip


@pytest.mark.usefixtures("fixed_latency")
def test_equal_timings_keep_onnx_runtime_and_report_every_candidate(tmp_path: Path) -> None:
    require_module("openvino", OPENVINO_EXTRA)
    result = _compress(tmp_path)
    assert result.engine == "onnxruntime" and result.engine_options == {}
    choice = result.report["engine_choice"]
    rows = choice["candidates"]
    assert choice["engine"] == "onnxruntime" and [r.get("chosen", False) for r in rows] == [True] + [
        False
    ] * (len(rows) - 1)
    assert [(r["engine"], r["label"]) for r in rows][:2] == [
        ("onnxruntime", "our artifact"),
        ("openvino", "our artifact, f32"),
    ]
    assert all(r["latency_ratio"] == 1.0 for r in rows) and rows[0]["budgets_met"] and rows[1]["budgets_met"]
    # bf16 (where the CPU has it) and NNCF's int8 (when installed) are measured like the others
    assert all(r["engine"] == "openvino" and ("bf16" in r["label"] or "NNCF" in r["label"]) for r in rows[2:])


def test_openvino_chosen_when_faster_in_every_run_then_served(
    tmp_path: Path, monkeypatch, broker, signing_keys
) -> None:
    require_module("openvino", OPENVINO_EXTRA)

    def openvino_faster(baseline, candidates, feed, **_):
        for candidate in candidates:  # each still runs: one that cannot run must fail
            candidate.run(None, dict(feed))
        per_run = [[1.0] * 5] + [[0.5] * 5 if i == 1 else [1.0] * 5 for i in range(1, len(candidates))]
        return timing(per_run)

    monkeypatch.setattr("compressor.measure.compare_latency", lambda s, f, **_: dict.fromkeys(s, 1.0))
    monkeypatch.setattr("compressor.engine_choice.timed_ratios", openvino_faster)
    result = _compress(tmp_path)
    assert result.engine == "openvino" and result.engine_options == {"inference_precision": "f32"}
    assert result.report["compressed"]["engine"] == "openvino" and result.report["budgets"]["met"]
    bundle_path = tmp_path / "mlp-ov.edgebundle"
    write_result_bundle(result, bundle_path, name="mlp-ov", version="1", profile=load_profile("x86-vnni-gateway"),
                        private_key=signing_keys.private_key)  # fmt: skip
    bundle = read_bundle(bundle_path, signing_keys.public_key)
    assert bundle.manifest.engine == "openvino"
    assert bundle.manifest.engine_options == {"inference_precision": "f32"}
    assert json.loads(bundle.manifest.to_json())["engine_options"] == {"inference_precision": "f32"}
    backend = load_backend(bundle.manifest, bundle.model_bytes, load_profile("x86-vnni-gateway"))
    assert run_selftest(backend.run, result.golden, result.golden_spec).passed

    store, port = tmp_path / "store", free_port()
    install(store, signing_keys.public_path, [bundle_path])
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=store,
                                 public_key=signing_keys.public_path, mqtt_port=broker.port, http_port=port)  # fmt: skip
    x = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    expected = reference_forward(WEIGHTS, x)
    with serving(config, tmp_path, str(ROOT)):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.get_model_metadata("mlp-ov")["platform"] == "openvino"
        over_http = infer_http(port, "mlp-ov", x)
        over_mqtt = infer_mqtt(broker, "mlp-ov", x)
    for got in (over_http, over_mqtt):
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        np.testing.assert_allclose(got, expected, atol=0.05)
    assert OUTPUT_NAME in result.report["compressed"]["fidelity"]["tasks"][0]["output"]
