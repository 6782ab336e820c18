"""Collector ingest benchmark: records stored per second, SQLite vs PostgreSQL, 1 vs 2 collectors on a
shared subscription, against what a plain subscriber receives through the same broker in the same run.

Each scenario: a fresh Mosquitto on a free loopback port, a fresh store, the collectors as real
``edgectl telemetry collect`` processes, and one publisher process that sends `--records` real
telemetry payloads (the daemon loop's record, each with its own outbox-style key) at QoS 1 from
`--devices` connections. A plain paho subscriber (QoS 1, automatic acks) in this process counts the
same messages. Rates are records over the time from the first publish to the last record stored
(polled every 50 ms) or received.

    python -m tools.bench_collect --records 20000 --devices 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.codecs.payloads import encode_telemetry
from edge_runtime.fleet.db import open_db
from edge_runtime.serving.metrics import Metrics
from edge_runtime.state.outbox import Outbox
from edge_runtime.telemetry.health import Health
from edge_runtime.telemetry.loop import TelemetryLoop
from tests.broker import Broker
from tests.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent


def _payloads(device: str, count: int) -> list[bytes]:
    """`count` real telemetry records of `device`, keyed as its outbox would key them."""
    metrics = Metrics()
    for index in range(50):
        metrics.observe("digits", "1", 0.0005 * (index + 1), True)
    loop = TelemetryLoop(device, f"edge/{device}/telemetry", f"edge/{device}/events", Outbox(None, 10),
                         interval_s=60, sources={"models": lambda: metrics.snapshot()["models"]},
                         health=lambda: Health.RUNNING)  # fmt: skip
    doc = loop.record()
    return [encode_telemetry({"key": f"{device}-{seq}", **doc, "n": seq}) for seq in range(1, count + 1)]


def _publish(port: int, devices: int, records: int, go: Any, published: Any) -> None:
    """Publisher process: `records` telemetry payloads at QoS 1, spread over `devices` connections."""
    clients = []
    for index in range(devices):
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-dev-{index}",
                             protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append((f"gw{index}", client, _payloads(f"gw{index}", records // devices)))
    go.wait()
    infos = []
    for step in range(records // devices):
        for device, client, payloads in clients:
            infos.append(client.publish(f"edge/{device}/telemetry", payloads[step], qos=1))
    for info in infos:
        info.wait_for_publish(600)
    published.value = sum(info.is_published() for info in infos)
    for _, client, _ in clients:
        client.disconnect()
        client.loop_stop()


class RawSubscriber:
    """A plain paho client (persistent session, automatic acks) counting what arrives on the telemetry topics."""

    def __init__(self, port: int, total: int) -> None:
        self.port, self.total, self.count, self.last = port, total, 0, 0.0
        self.done = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw",
                                  protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.connect()
        self.client.subscribe("edge/+/telemetry", qos=1)
        assert subscribed.wait(10)

    def connect(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=properties)
        self.client.loop_start()

    def away(self) -> None:
        """Disconnect, keeping the session (the broker queues for us)."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c: object, _u: object, _m: object) -> None:
        self.count += 1
        if self.count >= self.total:
            self.last = time.monotonic()
            self.done.set()


def _collectors(port: int, url: str, count: int, log: Path) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    share = ["--share", "bench"] if count > 1 else []
    processes = []
    with log.open("ab") as stderr:
        for index in range(count):
            command = [sys.executable, "-m", "edge_runtime.cli", "telemetry", "collect", "--broker",
                       f"127.0.0.1:{port}", "--db", url, "--client-id", f"bench-collector-{index}",
                       "--stats-every", os.environ.get("BENCH_STATS_S", "0"), *share]  # fmt: skip
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr))
    return processes


def _wait_stored(url: str, total: int, timeout: float) -> float:
    """When the store first held `total` telemetry records (monotonic), polled every 50 ms."""
    deadline = time.monotonic() + timeout
    store = None
    while time.monotonic() < deadline:
        try:
            store = store or open_db(url)
            if store.count("telemetry") >= total:
                store.close()
                return time.monotonic()
        except Exception:  # the collector creates the tables: not there yet
            store = None
        time.sleep(0.05)
    raise SystemExit(f"timed out: the store at {url} did not reach {total} records")


def _stop(processes: list[subprocess.Popen[bytes]]) -> list[str]:
    outputs = []
    for process in processes:
        process.send_signal(signal.SIGTERM)
        outputs.append(process.communicate(timeout=60)[0].decode().strip())
    return outputs


def scenario(kind: str, collectors: int, args: argparse.Namespace, postgres: PostgresServer | None) -> dict:
    """One run; its rates. backlog: everything is published while the collectors and the raw
    subscriber are away (their sessions queue it), then they return and drain it: capacity, not the
    publisher's speed. live: they run while the publisher sends."""
    directory = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    (directory / "broker").mkdir()
    broker = Broker(directory / "broker")
    if args.broker_inflight:
        with broker.config.open("a") as config:
            config.write(f"max_inflight_messages {args.broker_inflight}\n")
    broker.start()
    if kind == "sqlite":
        url = f"sqlite://{directory / 'fleet.sqlite'}"
    else:
        assert postgres is not None
        url = postgres.create_database(f"bench_{collectors}_{int(time.time() * 1000)}")
    log = directory / "collect.log"
    processes = _collectors(broker.port, url, collectors, log)
    total = args.records // args.devices * args.devices
    raw = RawSubscriber(broker.port, total)
    go, published = multiprocessing.Event(), multiprocessing.Value("i", -1)
    publisher = multiprocessing.Process(
        target=_publish, args=(broker.port, args.devices, args.records, go, published)
    )
    publisher.start()
    time.sleep(
        float(os.environ.get("BENCH_SETTLE_S", "3.0"))
    )  # collectors connected and subscribed, publishers connected
    if args.mode == "backlog":
        _stop(processes)
        raw.away()
        go.set()
        publisher.join(900)
        if published.value != total:
            raise SystemExit(f"the publisher got {published.value} of {total} records acknowledged")
        start = time.monotonic()
        processes = _collectors(broker.port, url, collectors, log)
        raw.connect()
    else:
        start = time.monotonic()
        go.set()
    stored_at = _wait_stored(url, total, timeout=600)
    raw.done.wait(600)
    publisher.join(120)
    outputs = _stop(processes)
    raw.away()
    broker.stop()
    return {
        "mode": args.mode,
        "store": kind,
        "collectors": collectors,
        "records": total,
        "broker_inflight": args.broker_inflight or 20,
        "stored_per_s": round(total / (stored_at - start)),
        "raw_per_s": round(total / (raw.last - start)) if raw.last else None,
        "collector_exit": outputs,
    }


def main() -> None:
    """Run the scenarios and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--collectors", default="1,2")
    parser.add_argument("--broker-inflight", type=int, default=0,
                        help="Mosquitto max_inflight_messages (0: its default, 20)")  # fmt: skip
    parser.add_argument("--mode", choices=["backlog", "live"], default="backlog")
    args = parser.parse_args()
    postgres = None
    if "postgres" in args.stores:
        postgres = PostgresServer(durable=True)  # fsync on, as a real server
        postgres.start()
    try:
        for kind in args.stores.split(","):
            for count in (int(n) for n in args.collectors.split(",")):
                print(json.dumps(scenario(kind, count, args, postgres)), flush=True)
    finally:
        if postgres is not None:
            postgres.remove()


if __name__ == "__main__":
    main()
