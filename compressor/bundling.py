"""Turn a compression result into a signed bundle."""

from __future__ import annotations

from pathlib import Path

from compressor.pipeline import CompressionResult
from edge_runtime.artifact import signing
from edge_runtime.artifact.bundle import write_bundle
from edge_runtime.artifact.golden import pack_golden
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile

__all__ = ["write_result_bundle"]

MODEL_MEMBER = {"onnx": "model.onnx", "tflite": "model.tflite"}
"""Artifact format -> bundle member name."""


def write_result_bundle(
    result: CompressionResult,
    output: Path,
    *,
    name: str,
    version: str,
    profile: DeviceProfile,
    private_key: signing.PrivateKey,
    force: bool = False,
) -> Manifest:
    """Write `result` as a signed bundle at `output`; returns the signed manifest."""
    engine = result.engine or str(profile.runtime.engine)
    model_file = MODEL_MEMBER[result.artifact_format]
    manifest = Manifest(
        name=name,
        version=version,
        profile=profile.name,
        engine=engine,
        model_file=model_file,
        inputs=result.inputs,
        outputs=result.outputs,
        files={},
        golden=result.golden_spec,
        session_config=dict(result.session_config),
        engine_options=dict(result.engine_options),
        report=result.report,
    )
    members = {model_file: result.model_bytes, result.golden_spec.file: pack_golden(result.golden)}
    return write_bundle(Path(output), manifest, members, private_key, force=force)
