"""Daemon time-to-ready and memory with a ~5 MB model, next to a bare ONNX Runtime process loading the same model.

Time to ready is measured from process start to the READY=1 datagram on a NOTIFY_SOCKET we create
(the daemon sends it once models are loaded and HTTP listens); RSS and peak RSS are read from
/proc/<pid>/status right after ready and after 200 HTTP requests. The goal: <= 1.5 s, <= 80 MB.

    python tools/bench_daemon.py [--runs 5]
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


def run_baseline(model_path: Path) -> dict[str, float]:
    """A bare Python process that imports onnxruntime and loads the same model."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", BASELINE, str(model_path)], stdin=subprocess.PIPE,
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


def main() -> None:
    """Start each several times and print a markdown table of medians."""
    from tools.bench_common import free_port, make_store, start_mosquitto, write_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    broker, mqtt_port = start_mosquitto(work)
    store, public_key, model = make_store(work, SIZES)
    model_path = work / "model.onnx"
    model_path.write_bytes(model)
    http_port = free_port()
    rows: dict[str, list[dict[str, float]]] = {"bare onnxruntime process (baseline)": [],
                                               "edgectl serve, HTTP + MQTT": [], "edgectl serve, HTTP only": []}  # fmt: skip
    mqtt_dir, http_dir = work / "mqtt", work / "http"
    mqtt_dir.mkdir()
    http_dir.mkdir()
    with_mqtt = write_config(mqtt_dir, store, public_key, mqtt_port, http_port, "bench")
    http_only = write_config(http_dir, store, public_key, 0, http_port, "bench")
    try:
        for _ in range(args.runs):
            rows["bare onnxruntime process (baseline)"].append(run_baseline(model_path))
            rows["edgectl serve, HTTP + MQTT"].append(run_daemon(with_mqtt, http_port, work))
            rows["edgectl serve, HTTP only"].append(run_daemon(http_only, http_port, work))
    finally:
        broker.terminate()
        broker.wait(10)
    print(
        f"model: ONNX MLP {SIZES}, {len(model) / 1e6:.1f} MB; median of {args.runs} starts; {os.cpu_count()} CPUs\n"
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
