"""Shared fixtures: signing keys, the device profile, a factory for small signed MLP bundles; in CI
(`CI=true`) every skip is reported as a failure."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from edge_runtime.artifact import signing
from edge_runtime.artifact.bundle import write_bundle
from edge_runtime.artifact.golden import GoldenCase, pack_golden
from edge_runtime.artifact.manifest import GoldenSpec, Manifest
from edge_runtime.config.profiles import DeviceProfile, Engine, load_profile
from edge_runtime.core.types import TensorSpec
from tests.mlp_models import (
    INPUT_NAME,
    OUTPUT_NAME,
    build_onnx_mlp,
    build_tflite_mlp,
    make_weights,
    reference_forward,
)

TFLITE_HINT = "pip install ai-edge-litert==2.3.0"

# Property tests: each sets its own max_examples and deadline; the profile sets how they run.
# "ci" is reproducible (fixed seed, no example database) and prints the blob that replays a failure.
hypothesis_settings.register_profile(
    "ci", derandomize=True, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.register_profile("dev", print_blob=True)
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI", "").lower() == "true" else "dev")
)


def in_ci() -> bool:
    """Whether this run is CI (`CI=true`), where a skip is a failure."""
    return os.environ.get("CI", "").lower() == "true"


def _as_ci_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skipped report into a failed one that says what was skipped and why."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped in CI (CI=true makes every skip a failure): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """In CI, a test skipped by `pytest.skip`, `importorskip` or a skip marker fails instead."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _as_ci_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """In CI, a module skipped at import (`allow_module_level=True`, module-level importorskip) fails."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        _as_ci_failure(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, a skip that slipped past the hooks above still fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if in_ci() and skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def require_module(module: str, extra: str, env: str = "EDGE_REQUIRE_EXTRAS") -> ModuleType:
    """Import an optional module; skip when it is missing, or fail when `env`=1 (CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not installed ({extra}): {exc}"
        if os.environ.get(env) == "1":
            pytest.fail(f"{message}; {env}=1 makes this a failure", pytrace=False)
        pytest.skip(message)


def require_tflite() -> None:
    """Skip (or, with EDGE_REQUIRE_TFLITE=1, fail) when the LiteRT interpreter is not installed."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        message = f"the TFLite tests need ai-edge-litert ({TFLITE_HINT})"
        if os.environ.get("EDGE_REQUIRE_TFLITE") == "1":
            pytest.fail(message + "; EDGE_REQUIRE_TFLITE=1 makes this a failure")
        pytest.skip(message)


@dataclass(frozen=True)
class Keys:
    """A signing key pair, as files and as loaded keys."""

    private_path: Path
    public_path: Path
    private_key: signing.PrivateKey
    public_key: signing.PublicKey


def make_keys(directory: Path, name: str = "signing") -> Keys:
    """Generate a key pair into `directory`."""
    private_path, public_path = signing.generate_keypair(directory, name)
    return Keys(
        private_path,
        public_path,
        signing.load_private_key(private_path),
        signing.load_public_key(public_path),
    )


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The key pair the test bundles are signed with (and the device trusts)."""
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def device_profile() -> DeviceProfile:
    """The built-in x86-vnni-gateway profile."""
    return load_profile("x86-vnni-gateway")


def golden_inputs(n_in: int, seed: int, cases: int = 3) -> list[np.ndarray]:
    """Seeded golden inputs: batch 1 cases and one batch-3 case."""
    rng = np.random.default_rng(seed + 1000)
    return [rng.normal(size=(1 if i < cases - 1 else 3, n_in)).astype(np.float32) for i in range(cases)]


BundleFactory = Callable[..., Path]


@pytest.fixture
def mlp_bundle_factory(tmp_path: Path, signing_keys: Keys, device_profile: DeviceProfile) -> BundleFactory:
    """Build a small signed MLP bundle (64 -> 32 -> 10 by default) and return its path."""
    counter = iter(range(10_000))

    def factory(
        name: str = "mlp",
        version: str = "1",
        *,
        seed: int = 0,
        sizes: tuple[int, int, int] = (64, 32, 10),
        engine: str = "onnxruntime",
        int8: bool = False,
        profile: DeviceProfile | None = None,
        keys: Keys | None = None,
        golden: bool = True,
        golden_outputs: Callable[[np.ndarray], np.ndarray] | None = None,
        report: dict[str, Any] | None = None,
        session_config: dict[str, str] | None = None,
        directory: Path | None = None,
    ) -> Path:
        profile = profile or device_profile
        weights = make_weights(*sizes, seed=seed)
        model_file = "model.tflite" if engine == "tflite" else "model.onnx"
        model = build_tflite_mlp(weights, int8=int8) if engine == "tflite" else build_onnx_mlp(weights)
        members = {model_file: model}
        spec = None
        if golden:
            expected = golden_outputs or (lambda x: reference_forward(weights, x))
            cases = [
                GoldenCase({INPUT_NAME: x}, {OUTPUT_NAME: expected(x)}) for x in golden_inputs(sizes[0], seed)
            ]
            members["golden.npz"] = pack_golden(cases)
            tolerance = 0.02 if int8 else 1e-4
            spec = GoldenSpec(file="golden.npz", cases=len(cases), rtol=tolerance, atol=tolerance)
        manifest = Manifest(
            name=name,
            version=version,
            profile=profile.name,
            engine=engine,
            model_file=model_file,
            inputs=(TensorSpec(INPUT_NAME, "float32", ("N", sizes[0])),),
            outputs=(TensorSpec(OUTPUT_NAME, "float32", ("N", sizes[2])),),
            files={},
            golden=spec,
            session_config=dict(session_config or {}),
            report={"profile": profile.to_dict()} if report is None else report,
        )
        folder = directory or tmp_path / "bundles"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{version}-{next(counter)}.edgebundle"
        write_bundle(path, manifest, members, (keys or signing_keys).private_key)
        return path

    return factory


FIXED_LATENCY_MS = 1.0
"""The latency every session gets under `fixed_latency`: every ratio is then exactly 1.0."""


@pytest.fixture
def fixed_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the compressor's latency measurement with equal, fixed timings, so a test's outcome never
    depends on how loaded the machine is (the decision logic has its own tests with injected timings)."""

    def equal_timings(
        sessions: Mapping[str, Any], feed: Mapping[str, np.ndarray], **_: Any
    ) -> dict[str, float]:
        for session in sessions.values():  # still run each once: a session that cannot run must fail
            session.run(None, dict(feed))
        return dict.fromkeys(sessions, FIXED_LATENCY_MS)

    # Every timing of the compressor (candidate choice and the final report) goes through this one.
    monkeypatch.setattr("compressor.measure.compare_latency", equal_timings)


def onnxruntime_only(name: str) -> DeviceProfile:
    """The profile `name` with ONNX Runtime its only engine. Under `fixed_latency` another engine is
    never chosen (it must be faster in every timing run), so building its candidates is wasted
    minutes on a real model (OpenVINO's took 5 of the layout test's 8 minutes)."""
    profile = load_profile(name)
    runtime = dataclasses.replace(profile.runtime, engine=Engine.ONNXRUNTIME, engines=(Engine.ONNXRUNTIME,))
    return dataclasses.replace(profile, runtime=runtime)
