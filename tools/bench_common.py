"""Shared pieces of the daemon benchmarks: a Mosquitto on a free port, a signed MLP bundle, a config."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from edge_runtime.artifact import signing
from edge_runtime.artifact.bundle import write_bundle
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.types import TensorSpec
from edge_runtime.state.store import ModelStore

__all__ = ["PROFILE", "free_port", "make_store", "start_mosquitto", "write_config"]

PROFILE = "x86-vnni-gateway"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mosquitto(directory: Path) -> tuple[subprocess.Popen, int]:
    """Mosquitto on a free loopback port (persistence off); returns the process and port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nset_tcp_nodelay true\nallow_anonymous true\npersistence false\nlog_type error\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return process, port
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("mosquitto did not start")


def mlp_onnx(sizes: tuple[int, int, int], seed: int = 0) -> bytes:
    """Gemm -> Relu -> Gemm -> Softmax with a free batch dimension (workstation side: imports onnx)."""
    from onnx import TensorProto, helper, numpy_helper

    n_in, hidden, n_out = sizes
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.normal(0, 1 / np.sqrt(n_in), (n_in, hidden)).astype(np.float32),
        "B1": np.zeros(hidden, np.float32),
        "W2": rng.normal(0, 1 / np.sqrt(hidden), (hidden, n_out)).astype(np.float32),
        "B2": np.zeros(n_out, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["input", "W1", "B1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def make_store(
    directory: Path, sizes: tuple[int, int, int], engine: str = "onnxruntime"
) -> tuple[Path, Path, bytes]:
    """A model store holding model 'mlp' of `sizes` for `engine`, signed with a fresh key; (store, public key, model)."""
    private_path, public_path = signing.generate_keypair(directory, "bench")
    profile = load_profile(PROFILE)
    model = mlp_onnx(sizes)
    manifest = Manifest(
        name="mlp",
        version="1",
        profile=PROFILE,
        engine=engine,
        model_file="model.onnx",
        inputs=(TensorSpec("input", "float32", ("N", sizes[0])),),
        outputs=(TensorSpec("probabilities", "float32", ("N", sizes[2])),),
        files={},
        report={"profile": profile.to_dict()},
    )
    bundle = directory / "mlp.edgebundle"
    write_bundle(bundle, manifest, {"model.onnx": model}, signing.load_private_key(private_path))
    store = ModelStore(directory / "store", signing.load_public_key(public_path), profile)
    store.install(bundle)
    store.activate("mlp", "1")
    return directory / "store", public_path, model


def write_config(
    directory: Path, store: Path, public_key: Path, mqtt_port: int, http_port: int, device: str
) -> Path:
    """A daemon settings file (telemetry every 60 s)."""
    config = directory / "edge.toml"
    config.write_text(
        f'device_id = "{device}"\nprofile = "{PROFILE}"\nstore = "{store}"\npublic_key = "{public_key}"\n'
        f"[http]\nport = {http_port}\n[mqtt]\nport = {mqtt_port}\nenabled = {'true' if mqtt_port else 'false'}\n"
        f'[telemetry]\ninterval_s = 60\n[outbox]\npath = "{directory / "outbox.sqlite"}"\n'
    )
    return config
