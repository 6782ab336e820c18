"""Model updates over MQTT, measured against baselines in the same run, through one local Mosquitto.

1. Push a ~10 MB bundle to a real daemon with `edgectl flash`'s client (full, uncompressed blocks)
   against publishing the same bytes raw, in the same block size and QoS, through the same broker
   (goal: the transfer at >= 50% of raw throughput); the device's verify, install, trial and swap
   times come from its own state reports.
2. Bytes on the wire for the full bundle, zstd blocks and a bsdiff4 delta, for (a) a model whose
   classifier head alone was retrained and (b) a fully retrained one.
3. Bytes re-sent after a broker restart at 50% of a transfer.

    python -m tools.bench_update [--hidden 2400] [--block-kib 128] [--window 16] [--save-mib 4]
                                 [--throughput-only]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.artifact import signing  # noqa: E402
from edge_runtime.artifact.bundle import write_bundle  # noqa: E402
from edge_runtime.artifact.manifest import Manifest  # noqa: E402
from edge_runtime.client.flash import FlashResult, flash, prepare  # noqa: E402
from edge_runtime.config.profiles import load_profile  # noqa: E402
from edge_runtime.config.settings import MqttSettings  # noqa: E402
from edge_runtime.core.types import TensorSpec  # noqa: E402
from edge_runtime.state.store import ModelStore  # noqa: E402
from edge_runtime.transports.mqtt.link import MqttLink  # noqa: E402
from tools.bench_common import PROFILE, free_port, start_mosquitto, write_config  # noqa: E402

DEVICE = "bench-update"


def _onnx(weights: dict[str, np.ndarray]) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    n_in, n_out = weights["W1"].shape[0], weights["W2"].shape[1]
    nodes = [
        helper.make_node("Gemm", ["input", "W1", "B1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def _weights(sizes: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    n_in, hidden, n_out = sizes
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.normal(0, 1 / np.sqrt(n_in), (n_in, hidden)).astype(np.float32),
        "B1": rng.normal(0, 0.1, hidden).astype(np.float32),
        "W2": rng.normal(0, 1 / np.sqrt(hidden), (hidden, n_out)).astype(np.float32),
        "B2": rng.normal(0, 0.1, n_out).astype(np.float32),
    }


def _bundle(folder: Path, key: signing.PrivateKey, version: str, weights: dict[str, np.ndarray]) -> Path:
    profile = load_profile(PROFILE)
    manifest = Manifest(
        name="mlp", version=version, profile=PROFILE, engine="onnxruntime", model_file="model.onnx",
        inputs=(TensorSpec("input", "float32", ("N", weights["W1"].shape[0])),),
        outputs=(TensorSpec("probabilities", "float32", ("N", weights["W2"].shape[1])),),
        files={}, report={"profile": profile.to_dict()},
    )  # fmt: skip
    path = folder / f"mlp-{version}.edgebundle"
    write_bundle(path, manifest, {"model.onnx": _onnx(weights)}, key)
    return path


def raw_baseline(port: int, payload: bytes, block_size: int) -> float:
    """Seconds to publish `payload` in `block_size` QoS 1 messages and receive them all (same client stack)."""
    settings = MqttSettings(host="127.0.0.1", port=port, workers=2)
    receiver, sender = MqttLink(settings, "bench-raw-rx"), MqttLink(settings, "bench-raw-tx")
    blocks = [payload[i : i + block_size] for i in range(0, len(payload), block_size)]
    got = [0]
    done = threading.Event()

    def on_block(_message: object) -> None:
        got[0] += 1
        if got[0] == len(blocks):
            done.set()

    receiver.subscribe("bench/raw", on_block, qos=1)
    for link in (receiver, sender):
        link.start()
        assert link.wait_connected(10)
    time.sleep(0.3)
    start = time.perf_counter()
    for block in blocks:
        sender.publish("bench/raw", block, qos=1)
    assert done.wait(120), f"raw baseline: {got[0]} of {len(blocks)} arrived"
    elapsed = time.perf_counter() - start
    for link in (sender, receiver):
        link.stop(timeout=1.0)
    return elapsed


def timed_flash(
    port: int, raw: bytes, block_size: int, **options: object
) -> tuple[FlashResult, dict[str, float]]:
    """Flash and time the phases: transfer on the host's clock, the device's steps from its reports."""
    marks: dict[str, float] = {}

    def progress(result: FlashResult, report: dict) -> None:
        state = str(report.get("state"))
        marks.setdefault(state, time.perf_counter())
        marks.setdefault(f"ts:{state}", float(report.get("ts", 0)))

    prepared = prepare(raw, block_size=block_size, compression="none")
    watcher = MqttLink(MqttSettings(host="127.0.0.1", port=port, workers=1), "bench-last-block")
    last_block = [0.0]

    def on_block(_message: object) -> None:  # the broker's copy of each block: when the last one went by
        last_block[0] = time.perf_counter()

    watcher.subscribe(f"edge/{DEVICE}/update/jobs/+/block", on_block, qos=0)
    watcher.start()
    assert watcher.wait_connected(10)
    start = time.perf_counter()
    result = flash(f"127.0.0.1:{port}", DEVICE, prepared, timeout=600, progress=progress, **options)  # type: ignore[arg-type]
    end = time.perf_counter()
    watcher.stop(timeout=1.0)
    device = {state: marks[f"ts:{state}"] for state in ("verifying", "installing", "trial", "committing",
                                                        "probation", "committed") if f"ts:{state}" in marks}  # fmt: skip
    began = marks.get("downloading", start)
    phases = {"total": end - start, "transfer": marks.get("verifying", end) - began,
              "delivered": last_block[0] - began}  # fmt: skip
    names = list(device)
    for here, following in itertools.pairwise(names):
        phases[here] = device[following] - device[here]
    return result, phases


def restart_at_half(
    port: int, broker: subprocess.Popen, directory: Path, raw: bytes, block_size: int
) -> tuple[FlashResult, subprocess.Popen]:
    """Flash while the broker is restarted once half of the blocks went by; (result, the new broker)."""
    prepared = prepare(raw, block_size=block_size, compression="none")
    watcher = MqttLink(MqttSettings(host="127.0.0.1", port=port, reconnect_min_s=0.1), "bench-watch")
    seen = threading.Event()
    count = [0]

    def on_block(_message: object) -> None:
        count[0] += 1
        if count[0] >= prepared.offer.blocks // 2:
            seen.set()

    watcher.subscribe(f"edge/{DEVICE}/update/jobs/+/block", on_block, qos=0)
    watcher.start()
    assert watcher.wait_connected(10)
    state: dict = {"broker": broker}

    def restart() -> None:
        seen.wait(120)
        state["broker"].kill()  # at once: what is in flight is lost
        state["broker"].wait(10)
        state["seen"] = count[0]
        time.sleep(1.0)
        state["broker"] = _restart_broker(directory, port)

    chaos = threading.Thread(target=restart)
    chaos.start()
    result = flash(f"127.0.0.1:{port}", DEVICE, prepared, timeout=600)
    chaos.join(30)
    watcher.stop(timeout=1.0)
    print(
        f"\nbroker killed and restarted after {state.get('seen')} of {prepared.offer.blocks} blocks went by"
    )
    return result, state["broker"]


def _restart_broker(directory: Path, port: int) -> subprocess.Popen:
    import shutil
    import socket

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen([binary, "-c", str(directory / "mosquitto.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return process
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("mosquitto did not restart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2400, help="MLP hidden width (2400: a ~10 MB bundle)")
    parser.add_argument("--block-kib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="timed pushes (the median is printed)")
    parser.add_argument("--window", type=int, default=16, help="the device's [update] window (blocks)")
    parser.add_argument("--save-mib", type=float, default=4.0, help="the device's [update] save_bytes, MiB")
    parser.add_argument("--throughput-only", action="store_true", help="skip the bytes and restart parts")
    args = parser.parse_args()
    sizes, block = (1024, args.hidden, 100), args.block_kib * 1024
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        private_path, public_path = signing.generate_keypair(folder, "bench")
        key = signing.load_private_key(private_path)
        base = _weights(sizes, seed=1)
        rng = np.random.default_rng(9)
        head = {
            **base,
            "W2": rng.normal(0, 0.02, base["W2"].shape).astype(np.float32),
            "B2": base["B2"] + 0.01,
        }
        v1 = _bundle(folder, key, "1", base)
        variants = {
            "3": _bundle(folder, key, "3", head),
            "4": _bundle(folder, key, "4", _weights(sizes, seed=4)),
        }
        for index in range(args.repeat):  # one new version per timed push
            version = str(10 + index)
            variants[version] = _bundle(folder, key, version, _weights(sizes, seed=10 + index))
        store = ModelStore(folder / "store", signing.load_public_key(public_path), load_profile(PROFILE))
        store.activate("mlp", store.install(v1).version)
        broker, port = start_mosquitto(folder)
        config = write_config(folder, folder / "store", public_path, port, free_port(), DEVICE)
        with config.open("a") as handle:
            handle.write(f"[update]\nwindow = {args.window}\nsave_bytes = {int(args.save_mib * (1 << 20))}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        daemon = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(3.0)
            print(f"device [update]: window {args.window} blocks, save_bytes {args.save_mib:g} MiB; "
                  f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
            report(folder, port, broker, v1, variants, block, args.repeat, args.window, args.throughput_only)
        finally:
            daemon.terminate()
            daemon.wait(20)
            broker.terminate()
            broker.wait(10)


def report(
    folder: Path,
    port: int,
    broker: subprocess.Popen,
    v1: Path,
    variants: dict[str, Path],
    block: int,
    repeat: int,
    window: int = 16,
    throughput_only: bool = False,
) -> None:
    """Run the three measurements and print them (timings: the median of `repeat` runs)."""
    full = variants["10"].read_bytes()
    mb = len(full) / 1e6
    print(f"bundle: {mb:.2f} MB, block {block // 1024} KiB, QoS 1, loopback Mosquitto, median of {repeat}")
    raw_runs, runs = [], []
    for index in range(repeat):
        raw_runs.append(raw_baseline(port, full, block))
        result, phases = timed_flash(port, variants[str(10 + index)].read_bytes(), block)
        assert result.state == "committed", result.reason
        runs.append(phases)
    raw_s = statistics.median(raw_runs)
    phases = {
        key: statistics.median(run[key] for run in runs) for key in runs[0] if all(key in r for r in runs)
    }
    print("\n| what | seconds | MB/s |\n|---|---:|---:|")
    print(f"| raw publish of the same bytes (baseline) | {raw_s:.3f} | {mb / raw_s:.1f} |")
    print(f"| update transfer (pulled, checked, written, fdatasynced, journal saved) | {phases['transfer']:.3f} | "
          f"{mb / phases['transfer']:.1f} |")  # fmt: skip
    print(f"| ... of which blocks delivered (last block through the broker) | {phases['delivered']:.3f} | "
          f"{mb / phases['delivered']:.1f} |")  # fmt: skip
    print(f"| ... and made durable after the last block (fdatasync, journal) | "
          f"{phases['transfer'] - phases['delivered']:.3f} | |")  # fmt: skip
    for step in ("verifying", "installing", "trial", "committing"):
        if step in phases:
            print(f"| device: {step} | {phases[step]:.3f} | |")
    print(f"| whole flash, offer to committed | {phases['total']:.3f} | |")
    print(f"\ntransfer at {100 * raw_s / phases['transfer']:.0f}% of raw throughput (goal >= 50%); "
          f"blocks delivered at {100 * raw_s / phases['delivered']:.0f}%")  # fmt: skip
    if throughput_only:
        return

    base = v1.read_bytes()
    print(
        "\n| bytes on the wire | full | zstd blocks | bsdiff4 delta | delta computed in |\n|---|---:|---:|---:|---:|"
    )
    for label, version in (("(a) classifier head retrained", "3"), ("(b) fully retrained", "4")):
        raw = variants[version].read_bytes()
        zstd = prepare(raw, block_size=block, compression="zstd").wire_bytes
        start = time.perf_counter()
        import bsdiff4

        delta = len(bsdiff4.diff(base, raw))
        took = time.perf_counter() - start
        print(f"| {label} | {len(raw):,} | {zstd:,} | {delta:,} | {took:.1f} s |")

    raw = variants["4"].read_bytes()
    result, broker = restart_at_half(port, broker, folder, raw, block)
    assert result.state == "committed", result.reason
    print(f"re-sent after the restart: {result.blocks_resent} of {result.blocks} blocks asked for and sent again "
          f"({result.blocks_resent * block:,} bytes of {len(raw):,}; window {window} blocks); the device received "
          f"{result.duplicates} blocks twice ({result.duplicates * block:,} bytes, MQTT redelivery included); "
          f"final state {result.state}")  # fmt: skip
    broker.terminate()
    print(f"sha256 of the pushed bundle: {hashlib.sha256(raw).hexdigest()[:16]}...")


if __name__ == "__main__":
    main()
