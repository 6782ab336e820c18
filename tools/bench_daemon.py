"""Daemon time-to-ready and memory with a ~5 MB model, next to a bare ONNX Runtime process loading the same model.

Time to ready is measured from process start to the READY=1 datagram on a NOTIFY_SOCKET we create
(the daemon sends it once models are loaded and HTTP listens); RSS and peak RSS are read from
/proc/<pid>/status right after ready and after 200 HTTP requests. The goal: <= 1.5 s, <= 80 MB.
`--engine openvino` (or `both`) serves the same model with the OpenVINO engine, next to a bare
process that imports openvino and compiles it.

    python tools/bench_daemon.py [--runs 5] [--engine onnxruntime|openvino|both]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = (784, 1536, 10)  # 784*1536 + 1536*10 float32 weights: about 4.9 MB
BASELINE = """
import sys, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
print("ready", flush=True)
sys.stdin.read()
"""
BASELINE_OPENVINO = """
import sys, openvino as ov
core = ov.Core()
config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 1}
compiled = core.compile_model(core.read_model(sys.argv[1]), "CPU", config)
print("ready", flush=True)
sys.stdin.read()
"""


def _status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def run_daemon(config: Path, http_port: int, work: Path) -> dict[str, float]:
    """One daemon start: seconds to READY=1, RSS at ready and after 200 requests."""
    notify_path = work / f"notify-{time.monotonic_ns()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    start = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_runtime.cli",
            "serve",
            "--config",
            str(config),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        while b"READY=1" not in listener.recv(4096):
            pass
        ready = time.perf_counter() - start
        at_ready = _status(process.pid)
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, SIZES[0]],
                                       "data": [0.1] * SIZES[0]}]}).encode()  # fmt: skip
        url = f"http://127.0.0.1:{http_port}/v2/models/mlp/infer"
        for _ in range(200):
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10).read()
        after = _status(process.pid)
    finally:
        process.terminate()
        process.wait(20)
        listener.close()
    return {
        "ready_s": ready,
        "rss_mb": at_ready["VmRSS"],
        "rss_after_mb": after["VmRSS"],
        "peak_mb": after["VmHWM"],
    }


def run_baseline(model_path: Path, code: str = BASELINE) -> dict[str, float]:
    """A bare Python process that imports the engine and loads the same model."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, str(model_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    process.stdout.readline()  # type: ignore[union-attr]
    ready = time.perf_counter() - start
    status = _status(process.pid)
    process.communicate("")
    return {
        "ready_s": ready,
        "rss_mb": status["VmRSS"],
        "rss_after_mb": status["VmRSS"],
        "peak_mb": status["VmHWM"],
    }


def _setups(
    work: Path, engine: str, mqtt_port: int, http_port: int
) -> dict[str, Callable[[], dict[str, float]]]:
    """Row name -> one measured start, for the engine's store (bare process, daemon with and without MQTT)."""
    from tools.bench_common import make_store, write_config

    base = work / engine
    base.mkdir()
    store, public_key, model = make_store(base, SIZES, engine)
    model_path = base / "model.onnx"
    model_path.write_bytes(model)
    mqtt_dir, http_dir = base / "mqtt", base / "http"
    mqtt_dir.mkdir()
    http_dir.mkdir()
    with_mqtt = write_config(mqtt_dir, store, public_key, mqtt_port, http_port, "bench")
    http_only = write_config(http_dir, store, public_key, 0, http_port, "bench")
    code = BASELINE_OPENVINO if engine == "openvino" else BASELINE
    return {
        f"bare {engine} process (baseline)": lambda: run_baseline(model_path, code),
        f"edgectl serve, HTTP + MQTT, {engine}": lambda: run_daemon(with_mqtt, http_port, work),
        f"edgectl serve, HTTP only, {engine}": lambda: run_daemon(http_only, http_port, work),
    }


def main() -> None:
    """Start each several times and print a markdown table of medians."""
    from tools.bench_common import free_port, start_mosquitto

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--engine", choices=("onnxruntime", "openvino", "both"), default="onnxruntime")
    args = parser.parse_args()
    engines = ("onnxruntime", "openvino") if args.engine == "both" else (args.engine,)
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    broker, mqtt_port = start_mosquitto(work)
    http_port = free_port()
    setups: dict[str, Callable[[], dict[str, float]]] = {}
    for engine in engines:
        setups.update(_setups(work, engine, mqtt_port, http_port))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    try:
        for _ in range(args.runs):
            for name, start in setups.items():
                rows[name].append(start())
    finally:
        broker.terminate()
        broker.wait(10)
    one, five, fifteen = os.getloadavg()
    print(
        f"model: ONNX MLP {SIZES}, about 4.9 MB; median of {args.runs} starts; {os.cpu_count()} CPUs; "
        f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} at the end\n"
    )
    print("| process | time to ready s | RSS at ready MB | RSS after 200 requests MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"| {name} | {med['ready_s']:.2f} | {med['rss_mb']:.1f} | {med['rss_after_mb']:.1f} | {med['peak_mb']:.1f} |"
        )
    print("\ngoal: time to ready <= 1.5 s, RSS <= 80 MB")


if __name__ == "__main__":
    main()
