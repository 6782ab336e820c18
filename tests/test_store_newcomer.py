"""A newcomer's path, as README gives it: demo -> store install -> serve with examples/device.toml
(unchanged) -> predict with the demo model's real tensor names (pixels -> logits)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.broker import free_port
from tests.test_store_reload import ENV, ROOT, serving, stop


def edgectl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


@pytest.mark.slow
def test_demo_install_serve_predict_with_the_sample_config(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    edgectl(tmp_path, "demo", "-o", "demo")
    (tmp_path / "examples").mkdir()
    config = tmp_path / "examples" / "device.toml"
    shutil.copyfile(ROOT / "examples" / "device.toml", config)
    installed = edgectl(tmp_path, "store", "install", "demo/digits.edgebundle", "--store", "demo/store",
                        "--key", "demo/demo.pub", "--create", "--activate")  # fmt: skip
    assert "installed digits 1" in installed.stdout and "active: digits 1" in installed.stdout
    port = free_port()
    # The sample as is, only on a free port (the test machine may already use 8000).
    local = tmp_path / "examples" / "device-test.toml"
    local.write_text(config.read_text().replace("port = 8000", f"port = {port}"))
    pixels = (load_digits().data[:1] / 16.0).astype(np.float32)
    np.save(tmp_path / "x.npy", pixels)
    with serving(local) as (process, _):
        answer = edgectl(tmp_path, "predict", "digits", "--input", "pixels=x.npy", "--http",
                         f"http://127.0.0.1:{port}", "--json")  # fmt: skip
        inline = edgectl(tmp_path, "predict", "digits", "--input", f"pixels={json.dumps(pixels.tolist())}",
                         "--http", f"http://127.0.0.1:{port}")  # fmt: skip
        log = stop(process)
    output = json.loads(answer.stdout)["outputs"][0]
    assert output["name"] == "logits" and output["shape"] == [1, 10]
    reference = ort.InferenceSession(str(tmp_path / "demo" / "digits.onnx")).run(
        ["logits"], {"pixels": pixels}
    )[0]
    assert int(np.argmax(output["data"])) == int(reference.argmax()) == int(load_digits().target[0])
    assert "logits [1, 10] float32" in inline.stdout
    assert "serving 1 model(s), 0 refused" in log and "Traceback" not in log
