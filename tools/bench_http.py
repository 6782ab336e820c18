"""HTTP serving benchmark: our v2 server vs a plain Flask `/predict` wrapper, side by side in one run.

Both serve the same digits-sized MLP (64-128-10, built in code) with the same ONNX Runtime session
settings (1 intra-op thread), each in its own process on 127.0.0.1, driven by the same load
generator: `wrk` (Debian package) with a Lua script for the POST body when it is installed,
otherwise a Python keep-alive client (which may itself be the bottleneck; the output says which).

    python tools/bench_http.py [--duration 5] [--connections 1 4]

Prints a markdown table with req/s, p50 and p99 per server and connection count, and the ratio
ours / Flask. Every run is bounded in time (wrk) or request count (Python client).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench_common import free_port, mlp_onnx

MODEL_NAME = "digits"
SIZES = (64, 128, 10)


def build_model(path: Path) -> None:
    """The MLP 64-128-10 (Gemm, Relu, Gemm, Softmax) with seeded weights, as ONNX."""
    path.write_bytes(mlp_onnx(SIZES))


def serve_ours(workdir: Path, port: int, inline_max_ms: float) -> None:
    """Child process: sign a bundle, install it in a store, load it, serve the v2 API."""
    from edge_runtime.artifact import signing
    from edge_runtime.artifact.bundle import write_bundle
    from edge_runtime.artifact.manifest import Manifest
    from edge_runtime.config.profiles import load_profile
    from edge_runtime.config.settings import HttpSettings
    from edge_runtime.core.types import TensorSpec
    from edge_runtime.serving.dataplane import DataPlane
    from edge_runtime.serving.registry import ModelRegistry
    from edge_runtime.state.store import ModelStore
    from edge_runtime.transports.http.server import HttpServer

    profile = load_profile("x86-vnni-gateway")
    private_path, public_path = signing.generate_keypair(workdir / "keys")
    manifest = Manifest(
        name=MODEL_NAME,
        version="1",
        profile=profile.name,
        engine="onnxruntime",
        model_file="model.onnx",
        inputs=(TensorSpec("input", "float32", ("N", SIZES[0])),),
        outputs=(TensorSpec("probabilities", "float32", ("N", SIZES[2])),),
        files={},
        report={"profile": profile.to_dict()},
    )
    bundle = workdir / "digits.edgebundle"
    members = {"model.onnx": (workdir / "model.onnx").read_bytes()}
    write_bundle(bundle, manifest, members, signing.load_private_key(private_path))
    store = ModelStore(workdir / "store", signing.load_public_key(public_path), profile)
    store.install(bundle)
    store.activate(MODEL_NAME, "1")
    registry = ModelRegistry(profile, threads=1)
    registry.load_all(store)
    server = HttpServer(DataPlane(registry), HttpSettings(port=port, inline_max_ms=inline_max_ms))
    server.start()
    while True:
        time.sleep(3600)


def serve_flask(workdir: Path, port: int, inline_max_ms: float) -> None:
    """Child process: the plain Flask tutorial wrapper around one ONNX Runtime session."""
    import logging

    import onnxruntime as ort
    from flask import Flask, jsonify, request

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log: the kinder baseline
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(workdir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    app = Flask("predict")

    @app.route("/predict", methods=["POST"])
    def predict():  # the tutorial shape: JSON in, numpy, session.run, JSON out
        data = request.get_json()
        x = np.array(data["inputs"], dtype=np.float32).reshape(-1, SIZES[0])
        y = session.run(None, {"input": x})[0]
        return jsonify({"outputs": y.tolist()})

    app.run(host="127.0.0.1", port=port, threaded=True)


def wait_answering(url: str, body: bytes, deadline: float = 30.0) -> bytes:
    """Poll until the server answers the benchmark request; return the answer."""
    stop = time.monotonic() + deadline
    while True:
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.read()
        except OSError:
            if time.monotonic() > stop:
                raise
            time.sleep(0.2)


def _parse_wrk_time(text: str) -> float:
    """wrk's '123.45us' / '1.20ms' / '2.00s' in milliseconds."""
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, body: bytes, connections: int, duration: float, workdir: Path) -> dict[str, float]:
    """Drive `url` with wrk for `duration` seconds; req/s, p50, p99 (ms)."""
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise SystemExit(f"{url} answered {errors.group(1)} requests with an error:\n{output}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50": _parse_wrk_time(re.search(r"\s50%\s+(\S+)", output).group(1)),
        "p99": _parse_wrk_time(re.search(r"\s99%\s+(\S+)", output).group(1)),
    }


def _python_client(args: tuple[str, int, bytes, int]) -> list[float]:
    """One keep-alive connection sending `count` requests; latencies in ms."""
    import http.client
    from urllib.parse import urlsplit

    url, _, body, count = args
    parts = urlsplit(url)
    latencies = []
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    for _ in range(count):
        start = time.perf_counter()
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{url} answered {response.status}")
        latencies.append((time.perf_counter() - start) * 1000.0)
        if response.getheader("Connection", "").lower() == "close" or response.version == 10:
            conn.close()
    return latencies


def run_python(url: str, body: bytes, connections: int, requests: int) -> dict[str, float]:
    """Fallback load generator: `connections` processes, `requests` requests in all."""
    per = max(1, requests // connections)
    start = time.perf_counter()
    with multiprocessing.Pool(connections) as pool:
        results = pool.map(_python_client, [(url, i, body, per) for i in range(connections)])
    elapsed = time.perf_counter() - start
    latencies = np.concatenate([np.asarray(r) for r in results])
    return {
        "rps": latencies.size / elapsed,
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median req/s (its own p50 and p99 kept with it)."""
    return sorted(runs, key=lambda run: run["rps"])[len(runs) // 2]


def main() -> None:
    """Run both servers, benchmark each at every connection count, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--requests", type=int, default=5000, help="requests per run (Python client)")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is shown")
    parser.add_argument(
        "--inline-max-ms", type=float, default=1.0, help="our server runs models faster than this on its loop"
    )
    parser.add_argument("--serve", choices=["ours", "flask"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_ours if args.serve == "ours" else serve_flask)(args.workdir, args.port, args.inline_max_ms)
        return
    x = np.random.default_rng(1).normal(size=(1, SIZES[0])).astype(np.float32)
    v2_body = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, SIZES[0]], "data": x.ravel().tolist()}
            ]
        }
    ).encode()
    flask_body = json.dumps({"inputs": x.ravel().tolist()}).encode()
    use_wrk = shutil.which("wrk") is not None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model.onnx")
        servers: dict[str, tuple[str, bytes]] = {}
        children = []
        try:
            for kind, path, body in (
                ("ours", f"/v2/models/{MODEL_NAME}/infer", v2_body),
                ("flask", "/predict", flask_body),
            ):
                port = free_port()
                command = [
                    sys.executable,
                    __file__,
                    "--serve",
                    kind,
                    "--workdir",
                    str(workdir),
                    "--port",
                    str(port),
                ]
                command += ["--inline-max-ms", str(args.inline_max_ms)]
                children.append(subprocess.Popen(command, stderr=subprocess.DEVNULL, env={**os.environ}))
                url = f"http://127.0.0.1:{port}{path}"
                servers[kind] = (url, body)
                wait_answering(url, body)
            ours = np.asarray(json.loads(wait_answering(*servers["ours"]))["outputs"][0]["data"])
            theirs = np.asarray(json.loads(wait_answering(*servers["flask"]))["outputs"]).ravel()
            assert np.allclose(ours, theirs, atol=1e-6), "the two servers disagree"
            runs: dict[tuple[str, int], list[dict[str, float]]] = {}
            for url, body in servers.values():
                if use_wrk:
                    run_wrk(url, body, 1, 1.0, workdir)  # warm-up
            for _ in range(args.rounds):  # interleaved, so both see the same background load
                for connections in args.connections:
                    for kind, (url, body) in servers.items():
                        if use_wrk:
                            result = run_wrk(url, body, connections, args.duration, workdir)
                        else:
                            result = run_python(url, body, connections, args.requests)
                        runs.setdefault((kind, connections), []).append(result)
            results = {key: median_run(values) for key, values in runs.items()}
        finally:
            for child in children:
                child.terminate()
                child.wait(timeout=10)
    generator = (
        "wrk -t1 (Lua POST script)" if use_wrk else "Python http.client processes (may be the bottleneck)"
    )
    print(
        f"load generator: {generator}; model: MLP {'-'.join(map(str, SIZES))}, batch 1, ORT 1 thread; "
        f"median of {args.rounds} interleaved rounds of {args.duration:g} s\n"
    )
    print("| connections | ours req/s | Flask req/s | ratio | ours p50 / p99 ms | Flask p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for connections in args.connections:
        ours_r, flask_r = results["ours", connections], results["flask", connections]
        print(
            f"| {connections} | {ours_r['rps']:.0f} | {flask_r['rps']:.0f} | {ours_r['rps'] / flask_r['rps']:.1f}x "
            f"| {ours_r['p50']:.3f} / {ours_r['p99']:.3f} | {flask_r['p50']:.3f} / {flask_r['p99']:.3f} |"
        )


if __name__ == "__main__":
    main()
