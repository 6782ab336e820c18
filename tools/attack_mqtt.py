"""Replay the MQTT attacks of issue 10 against a real daemon on loopback and print case -> outcome.

Starts its own Mosquitto and a daemon process (``python -m edge_runtime.cli serve``), sends each
hostile case a bounded number of times with a bounded wait, and reports: how the requests were
answered (status counts), replies leaked to a topic they must not reach, whether the daemon still
answers a good request afterwards, reconnects seen (presence ``online`` published again), and the
daemon's RSS before/after (and its peak, VmHWM).

    python tools/attack_mqtt.py [--root DIR] [--big 60] [--big-mb 14] [--burst 1000] [--wait 20]

``--root`` runs the daemon from another source tree (e.g. an older checkout) with the same cases.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.bench_common import free_port, make_store, start_mosquitto  # noqa: E402

DEVICE = "atk"
BASE = f"edge/{DEVICE}"
DEFAULT = f"{BASE}/reply/mlp"
INFER = f"{BASE}/infer/mlp"


class Client:
    """A paho client recording every message by topic (MQTT 5 or 3.1.1)."""

    def __init__(self, port: int, *, protocol: int = 5, client_id: str = "") -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
        self.protocol = protocol
        self.got: dict[str, list[bytes]] = collections.defaultdict(list)
        self.changed = threading.Condition()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, message: object) -> None:
        with self.changed:
            self.got[message.topic].append(message.payload)  # type: ignore[attr-defined]
            self.changed.notify_all()

    def subscribe(self, *topics: str) -> None:
        """Subscribe (QoS 1) and give the broker a moment to take it."""
        for topic in topics:
            self.client.subscribe(topic, 1)
        time.sleep(0.3)

    def publish(self, topic: str, payload: bytes, *, response_topic: str | None = None, qos: int = 0) -> None:
        """Publish and wait until it left the socket."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = None
        if response_topic is not None and self.protocol == 5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
        self.client.publish(topic, payload, qos=qos, properties=properties).wait_for_publish(30)

    def wait(self, predicate: Callable[[], bool], seconds: float) -> bool:
        """Wait up to `seconds` for `predicate` (checked whenever a message arrives)."""
        deadline = time.monotonic() + seconds
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Device:
    """The daemon process under attack and what it logged."""

    process: subprocess.Popen
    log: Path
    http_port: int
    mqtt_port: int

    def memory(self) -> tuple[float, float]:
        """(RSS, peak RSS) in MB from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def lines(self, fragment: str) -> list[str]:
        """Lines of the daemon's log holding `fragment`."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if fragment in line]

    def ready_status(self) -> int:
        """HTTP status of /v2/health/ready."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0


@dataclass
class Outcome:
    case: str
    sent: int
    answers: collections.Counter = field(default_factory=collections.Counter)
    leaked: int = 0
    answering: bool = False
    reconnects: int = 0
    rss: tuple[float, float, float] = (0.0, 0.0, 0.0)
    note: str = ""


def _request(rows: int = 1, **extra: object) -> bytes:
    x = np.random.default_rng(rows).normal(size=(rows, 64)).astype(np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _statuses(payloads: list[bytes]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for payload in payloads:
        try:
            doc = json.loads(payload)
        except ValueError:
            counts["not JSON"] += 1
            continue
        counts[doc.get("status", 200) if isinstance(doc, dict) else "?"] += 1
    return counts


def start_daemon(work: Path, mqtt_port: int, root: Path, name: str = "daemon") -> Device:
    """The daemon in its own process, from the source tree `root`; waits until it is online."""
    store, public_key = work / "store", work / "bench.pub"
    if not store.exists():
        make_store(work, (64, 128, 10))
    http_port = free_port()
    config = work / f"{name}.toml"
    config.write_text(
        f'device_id = "{DEVICE}"\nprofile = "x86-vnni-gateway"\nstore = "{store}"\npublic_key = "{public_key}"\n'
        f"[http]\nport = {http_port}\n[mqtt]\nport = {mqtt_port}\n"
        f"reconnect_min_s = 0.2\nreconnect_max_s = 4.0\n[telemetry]\ninterval_s = 60\n"
        f'[outbox]\npath = "{work / (name + "-outbox.sqlite")}"\n'
    )
    log = work / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=work,
    )  # fmt: skip
    device = Device(process, log, http_port, mqtt_port)
    watcher = Client(mqtt_port)
    watcher.subscribe(f"{BASE}/status")
    online = watcher.wait(lambda: any(b'"online"' in p for p in watcher.got[f"{BASE}/status"]), 60)
    watcher.close()
    if not online:
        raise RuntimeError(f"the daemon did not come online:\n{log.read_text()[-2000:]}")
    return device


def answering(port: int, seconds: float) -> bool:
    """True if the daemon is (back) online and answers one good MQTT 5 request within `seconds`."""
    probe = Client(port)
    topic = f"check/{time.monotonic_ns()}"
    probe.subscribe(topic, f"{BASE}/status")
    status = probe.got[f"{BASE}/status"]
    if not probe.wait(lambda: bool(status) and b'"online"' in status[-1], seconds):
        probe.close()
        return False
    probe.publish(INFER, _request(), response_topic=topic)
    ok = probe.wait(lambda: bool(probe.got[topic]), seconds)
    probe.close()
    return ok and b"outputs" in probe.got[topic][0]


def run_case(
    device: Device,
    case: str,
    payloads: list[bytes],
    *,
    protocol: int = 5,
    response_topic: str | None = None,
    leak_topics: tuple[str, ...] = (),
    answer_topic: str = DEFAULT,
    wait: float,
) -> Outcome:
    """Send `payloads`, collect the answers on `answer_topic` and anything leaked onto `leak_topics`."""
    port = device.mqtt_port
    watcher = Client(port)
    watcher.subscribe(*dict.fromkeys((answer_topic, f"{BASE}/status", *leak_topics)))
    before = device.memory()[0]
    attacker = Client(port, protocol=protocol)
    for payload in payloads:
        attacker.publish(INFER, payload, response_topic=response_topic)
    watcher.wait(lambda: len(watcher.got[answer_topic]) >= len(payloads), wait)
    attacker.close()
    outcome = Outcome(case, len(payloads), _statuses(watcher.got[answer_topic]))
    outcome.leaked = sum(
        1
        for topic in leak_topics
        if topic != answer_topic
        for p in watcher.got[topic]
        if b'"outputs"' in p or b'"error"' in p
    )
    outcome.answering = answering(port, wait)
    status = watcher.got[f"{BASE}/status"]
    outcome.reconnects = max(0, sum(b'"online"' in p for p in status) - 1)
    outcome.rss = (before, *device.memory())
    watcher.close()
    return outcome


def broker_down(
    device: Device, broker: subprocess.Popen, work: Path, seconds: float
) -> tuple[Outcome, subprocess.Popen]:
    """Stop Mosquitto for `seconds`: the daemon must log why and when it retries, then come back."""
    outcome = Outcome(f"broker down {seconds:.0f} s", 0)
    warned = len(device.lines("next attempt"))
    broker.terminate()
    broker.wait(10)
    time.sleep(seconds)
    ready_while_down = device.ready_status()
    lines = device.lines("next attempt")[warned:]
    broker = _restart_broker(work, device.mqtt_port)
    outcome.answering = answering(device.mqtt_port, 20)
    example = lines[-1].split("link: ")[-1] if lines else "-"
    outcome.note = (
        f"{len(lines)} WARNING lines, /v2/health/ready {ready_while_down} while down; last: {example}"
    )
    outcome.rss = (*device.memory()[:1], *device.memory())
    return outcome, broker


def _restart_broker(work: Path, port: int) -> subprocess.Popen:
    import shutil

    config = work / "mosquitto-again.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_type error\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    return process


def twin(device: Device, work: Path, root: Path, seconds: float) -> Outcome:
    """A second daemon with the same device id for `seconds`: a clear ERROR and backoff, not flapping."""
    outcome = Outcome(f"same client id, {seconds:.0f} s", 0)
    watcher = Client(device.mqtt_port)
    watcher.subscribe(f"{BASE}/status")
    other = None
    with contextlib.suppress(RuntimeError):  # it may never see itself online: that is the point
        other = start_daemon(work, device.mqtt_port, root, name="twin")
    time.sleep(seconds)
    flaps = sum(b'"online"' in p for p in watcher.got[f"{BASE}/status"])
    errors = device.lines("same client id") + (other.lines("same client id") if other else [])
    if other is not None:
        other.process.terminate()
        other.process.wait(15)
    watcher.close()
    outcome.reconnects = flaps
    outcome.answering = answering(device.mqtt_port, 20)
    outcome.note = f"{len(errors)} ERROR lines naming the id; {flaps} presence 'online' in {seconds:.0f} s"
    outcome.rss = (*device.memory()[:1], *device.memory())
    return outcome


def nested(depth: int) -> bytes:
    return (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": '
        + b"[" * depth
        + b"]" * depth
        + b"}]}"
    )


HEAD = (
    f"| {'case':<46} | {'sent':>4} | {'answered (status: count)':<24} | leaked | still answering | reconnects "
    "| RSS MB before -> after (peak) |"
)


def print_header() -> None:
    print(HEAD)
    print("|" + "|".join("-" * len(part) for part in HEAD.split("|")[1:-1]) + "|", flush=True)


def print_row(o: Outcome) -> None:
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(o.answers.items(), key=str)) or "-"
    rss = f"{o.rss[0]:.0f} -> {o.rss[1]:.0f} ({o.rss[2]:.0f})"
    answering = "yes" if o.answering else "NO"
    print(
        f"| {o.case:<46} | {o.sent:>4} | {answers:<24} | {o.leaked:>6} | {answering:<15} | {o.reconnects:>10} "
        f"| {rss:<29} |",
        flush=True,
    )
    if o.note:
        print(f"|   {o.note}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="source tree the daemon runs from")
    parser.add_argument("--burst", type=int, default=1000, help="requests in the wildcard burst")
    parser.add_argument("--big", type=int, default=60, help="how many large requests")
    parser.add_argument("--big-mb", type=float, default=14.0, help="size of each large request")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds to wait for answers per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="attack-mqtt-") as tmp:
        work = Path(tmp)
        broker, port = start_mosquitto(work)
        device = start_daemon(work, port, args.root)
        try:
            print_header()
            for case in attack(device, args):
                print_row(case())
            broker_case, broker = broker_down(device, broker, work, 5.0)
            print_row(broker_case)
            print_row(twin(device, work, args.root, 15.0))
        finally:
            device.process.terminate()
            device.process.wait(15)
            broker.terminate()
            broker.wait(10)
        tracebacks = len(device.lines("Traceback"))
        print(
            f"\ntracebacks in the daemon log: {tracebacks}; daemon exit code after SIGTERM: {device.process.returncode}"
        )
    return 0


def attack(device: Device, args: argparse.Namespace) -> list[Callable[[], Outcome]]:
    """The request cases, in the order of the issue (each runs when called)."""
    wait = args.wait
    other = "edge/other-device/infer/mlp"
    bad_topics = (f"{BASE}/status", f"{BASE}/telemetry", other)
    cases = [
        lambda: run_case(device, f"burst of {args.burst} x 130 KB, Response Topic atk/+/x",
                 [_request(rows=100, id=f"b{i}") for i in range(args.burst)],
                 response_topic="atk/+/x", wait=wait),
        lambda: run_case(device, "Response Topic $SYS/broker/x", [_request(id=f"s{i}") for i in range(13)],
                 response_topic="$SYS/broker/x", wait=wait),
        lambda: run_case(device, "reply_to $SYS/x (3.1.1)", [_request(id=f"r{i}", reply_to="$SYS/x") for i in range(13)],
                 protocol=311, wait=wait),
        lambda: run_case(device, "Response Topic edge/other-device/...", [_request(id=f"o{i}") for i in range(13)],
                 response_topic=other, leak_topics=bad_topics, wait=wait),
        lambda: run_case(device, "Response Topic = own status topic", [_request(id=f"t{i}") for i in range(13)],
                 response_topic=f"{BASE}/status", leak_topics=bad_topics, wait=wait),
        lambda: run_case(device, "reply_to = own telemetry topic (3.1.1)",
                 [_request(id=f"m{i}", reply_to=f"{BASE}/telemetry") for i in range(13)],
                 protocol=311, leak_topics=bad_topics, wait=wait),
        lambda: run_case(device, "reply_to with a control character (3.1.1)",
                 [_request(id=f"c{i}", reply_to="a\u0001b") for i in range(13)], protocol=311, wait=wait),
        lambda: run_case(device, "JSON nested 100k deep", [nested(100_000)] * 3, response_topic="atk/reply",
                 answer_topic="atk/reply", wait=wait),
        lambda: run_case(device, "NaN and Infinity inputs",
                 [_request().replace(b'"data": [', b'"data": [NaN, Infinity, ')] * 3,
                 response_topic="atk/reply", answer_topic="atk/reply", wait=wait),
        lambda: run_case(device, "outputs[].parameters of the wrong type",
                 [_request(outputs=[{"name": "probabilities", "parameters": "x"}])] * 3,
                 response_topic="atk/reply", answer_topic="atk/reply", wait=wait),
        lambda: run_case(device, "17 MB request (limit 16 MiB)", [_request(rows=14_000)] * 3, response_topic="atk/reply",
                 answer_topic="atk/reply", wait=wait),
    ]  # fmt: skip
    rows = int(args.big_mb * 1e6 / (64 * 20.5))
    big = _request(rows=rows)
    cases.append(
        lambda: run_case(device, f"{args.big} requests of {len(big) / 1e6:.0f} MB", [big] * args.big,
                 response_topic="atk/reply", answer_topic="atk/reply", wait=max(wait, 60))
    )  # fmt: skip
    return cases


if __name__ == "__main__":
    raise SystemExit(main())
