"""MQTT request -> response through one local Mosquitto: our daemon vs a bare paho echo responder.

Both answer MQTT 5 requests (response topic + correlation data) through the same broker, measured by
the same load generator running in its own process: p50/p99 with one request in flight, and msg/s
with several in flight. The goal: daemon p50 within 0.15 ms + model time of the echo's.

    python tools/bench_mqtt.py [--requests 3000] [--inflight 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = (64, 128, 10)  # the digits MLP of MEASURED.md


def _no_delay(_client: object, _userdata: object, sock: socket.socket) -> None:
    """The same TCP_NODELAY the daemon's link sets, so both sides are measured alike."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo(port: int, topic: str) -> None:
    """A bare paho responder: publish the payload back on the response topic, in the callback."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)

    def on_message(c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = message.properties.CorrelationData
        c.publish(message.properties.ResponseTopic, message.payload, qos=0, properties=props)

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(topic, 0)
    client.on_socket_open = _no_delay
    client.connect("127.0.0.1", port)
    client.loop_forever()


def generate(port: int, topic: str, payload: bytes, count: int, inflight: int) -> dict:
    """Send `count` requests keeping `inflight` outstanding; round-trip times in ms and msg/s."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    reply = f"bench/{os.getpid()}/reply"
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    state = {"next": 0, "errors": 0}
    done, ready = threading.Event(), threading.Event()

    def send(c: paho.Client) -> None:
        index = state["next"]
        state["next"] += 1
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = b"%d" % index
        sent_at[index] = time.perf_counter()
        c.publish(topic, payload, qos=0, properties=props)

    def on_message(c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        rtts.append(now - sent_at.pop(int(message.properties.CorrelationData)))
        state["errors"] += b'"error"' in message.payload
        if state["next"] < count:
            send(c)
        if len(rtts) == count:
            done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *_: ready.set()
    client.on_socket_open = _no_delay
    client.connect("127.0.0.1", port)
    client.subscribe(reply, 0)
    client.loop_start()
    ready.wait(10)
    start = time.perf_counter()
    for _ in range(min(inflight, count)):
        send(client)
    done.wait(300)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    ms = np.asarray(rtts) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "rate": count / elapsed,
            "errors": state["errors"]}  # fmt: skip


def _run_generator(port: int, topic: str, payload: bytes, count: int, inflight: int) -> dict:
    """The load generator in its own process, so its paho CPU is not charged to the responder."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        handle.write(payload)
    args = [sys.executable, __file__, "generate", str(port), topic, handle.name, str(count), str(inflight)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    os.unlink(handle.name)
    return json.loads(out)


def _model_ms(model: bytes, x: np.ndarray) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    times = []
    for _ in range(2000):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _measure(port: int, topic: str, payload: bytes, requests: int, inflight: int) -> dict:
    _run_generator(port, topic, payload, 300, 4)  # warm-up
    single = _run_generator(port, topic, payload, requests, 1)
    loaded = _run_generator(port, topic, payload, requests * 3, inflight)
    return {"p50": single["p50"], "p99": single["p99"], "rate": loaded["rate"], "p50_loaded": loaded["p50"],
            "errors": single["errors"] + loaded["errors"]}  # fmt: skip


def main() -> None:
    """Run both responders and print a markdown table."""
    from tools.bench_common import make_store, start_mosquitto, write_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--inflight", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker, port = start_mosquitto(work)
    store, public_key, model = make_store(work, SIZES)
    x = np.random.default_rng(0).normal(size=(1, SIZES[0])).astype(np.float32)
    payload = json.dumps({"v": 1, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, SIZES[0]],
                                              "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    echo_process = subprocess.Popen([sys.executable, __file__, "echo", str(port), "echo/req"], env=env)
    config = write_config(work, store, public_key, port, 0, "bench")
    daemon = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config),
                               "--log-level", "warning"], env=env)  # fmt: skip
    try:
        time.sleep(2.0)  # both subscribed (the warm-up phase absorbs any remaining start-up)
        results = {
            "bare paho echo (baseline)": _measure(port, "echo/req", payload, args.requests, args.inflight),
            "edge-runtime daemon (MLP 64-128-10)": _measure(
                port, "edge/bench/infer/mlp", payload, args.requests, args.inflight
            ),
        }
    finally:
        for process in (daemon, echo_process, broker):
            process.terminate()
            process.wait(10)
    model_ms = _model_ms(model, x)
    base = results["bare paho echo (baseline)"]
    print(f"MQTT 5 request->response via one Mosquitto, QoS 0, {args.requests} requests at 1 in flight, "
          f"{args.requests * 3} at {args.inflight} in flight; generator in its own process; {os.cpu_count()} CPUs\n")  # fmt: skip
    print(
        f"| responder | p50 ms (1 in flight) | p99 ms | msg/s ({args.inflight} in flight) | p50 ms loaded | vs echo p50 |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        delta = r["p50"] - base["p50"]
        print(f"| {name} | {r['p50']:.3f} | {r['p99']:.3f} | {r['rate']:.0f} | {r['p50_loaded']:.3f} | "
              f"{'+' if delta >= 0 else ''}{delta:.3f} ms |")  # fmt: skip
    print(f"\nmodel time (session.run alone, median): {model_ms:.3f} ms; goal: daemon p50 <= echo p50 + 0.15 ms + "
          f"model time = {base['p50'] + 0.15 + model_ms:.3f} ms")  # fmt: skip
    if any(r["errors"] for r in results.values()):
        print("WARNING: some replies were errors")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        echo(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "generate":
        port, topic, payload_file, count, inflight = sys.argv[2:7]
        result = generate(int(port), topic, Path(payload_file).read_bytes(), int(count), int(inflight))
        print(json.dumps(result))
    else:
        main()
