"""Device profiles: every built-in one loads; malformed ones are refused naming the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.config.profiles import Engine, QuantDtype, list_profiles, load_profile
from edge_runtime.core.errors import ProfileError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "device_profiles"


def test_every_profile_in_the_folder_loads() -> None:
    files = sorted(PROFILE_DIR.glob("*.toml"))
    loaded = {load_profile(path).name for path in files}
    assert loaded == {path.stem for path in files}
    assert {p.name for p in list_profiles()} == loaded
    assert {"x86-vnni-gateway", "raspberry-pi-4", "raspberry-pi-zero-2w", "jetson-orin-nano"} <= loaded


def test_profiles_carry_what_the_hardware_needs() -> None:
    vnni, avx2 = load_profile("x86-vnni-gateway"), load_profile("x86-avx2-gateway")
    assert "avx512_vnni" in vnni.hardware.cpu_features and not vnni.quantization.reduce_range
    assert avx2.quantization.reduce_range and avx2.quantization.name == "U8S8"
    zero = load_profile("raspberry-pi-zero-2w")
    assert zero.runtime.engine is Engine.TFLITE and zero.hardware.ram_mb == 512
    jetson = load_profile("jetson-orin-nano")
    assert jetson.runtime.execution_providers[0] == "TensorrtExecutionProvider"
    assert jetson.quantization.activation_type is QuantDtype.INT8


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def _base_text() -> str:
    return (PROFILE_DIR / "raspberry-pi-4.toml").read_text()


def test_user_profile_file_loads(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, _base_text().replace('"raspberry-pi-4"', '"my-pi"')))
    assert profile.name == "my-pi" and profile.source.endswith("mine.toml")


def test_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _base_text().replace("ram_mb = 4096", "ram_mb = 4096\nram_gb = 4"))
    with pytest.raises(ProfileError, match=r"mine\.toml: unknown key 'hardware\.ram_gb'"):
        load_profile(path)


def test_missing_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _base_text().replace("max_model_bytes = 32_000_000\n", ""))
    with pytest.raises(ProfileError, match=r"mine\.toml: missing key 'budgets\.max_model_bytes'"):
        load_profile(path)


def test_wrong_type_and_bad_enum_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"hardware\.cores must be an integer"):
        load_profile(_write(tmp_path, _base_text().replace("cores = 4", 'cores = "four"')))
    with pytest.raises(ProfileError, match=r"runtime\.engine must be one of onnxruntime, tflite"):
        load_profile(_write(tmp_path, _base_text().replace('engine = "onnxruntime"', 'engine = "tensorrt"')))


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown device profile 'pi-9'.*raspberry-pi-4"):
        load_profile("pi-9")


def test_cli_lists_and_shows_profiles() -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["profiles"])
    assert listed.exit_code == 0
    assert "jetson-orin-nano" in listed.output and "tflite" in listed.output
    shown = runner.invoke(cli, ["profiles", "raspberry-pi-zero-2w"])
    assert shown.exit_code == 0 and '"ram_mb": 512' in shown.output
    missing = runner.invoke(cli, ["profiles", "nope"])
    assert missing.exit_code == 1 and missing.output.startswith("error: unknown device profile 'nope'")


def test_x86_profiles_list_the_engines_they_try() -> None:
    for name in ("x86-vnni-gateway", "x86-avx2-gateway"):
        runtime = load_profile(name).runtime
        assert runtime.engines == (Engine.ONNXRUNTIME, Engine.OPENVINO)
        assert runtime.engine is Engine.ONNXRUNTIME
    pi = load_profile("raspberry-pi-4").runtime
    assert pi.engines == (Engine.ONNXRUNTIME,)  # the single `engine` key still works


def test_engines_in_order_of_preference(tmp_path: Path) -> None:
    only_list = _base_text().replace('engine = "onnxruntime"', 'engines = ["openvino", "onnxruntime"]')
    runtime = load_profile(_write(tmp_path, only_list)).runtime
    assert runtime.engine is Engine.OPENVINO and runtime.engines == (Engine.OPENVINO, Engine.ONNXRUNTIME)
    both = _base_text().replace(
        'engine = "onnxruntime"', 'engine = "onnxruntime"\nengines = ["onnxruntime", "tflite"]'
    )
    assert load_profile(_write(tmp_path, both)).runtime.engines == (Engine.ONNXRUNTIME, Engine.TFLITE)
    cases = [
        ('engine = "onnxruntime"\nengines = ["openvino", "onnxruntime"]', r"runtime\.engine 'onnxruntime' must be the first"),
        ('engines = ["openvino", "openvino"]', r"runtime\.engines names an engine twice"),
        ('engines = ["openvino", "tensorrt"]', r"runtime\.engines\[1\] must be one of onnxruntime, tflite, openvino"),
        ('engines = "openvino"', r"runtime\.engines must be a non-empty list"),
    ]  # fmt: skip
    for replacement, message in cases:
        path = _write(tmp_path, _base_text().replace('engine = "onnxruntime"', replacement))
        with pytest.raises(ProfileError, match=message):
            load_profile(path)
