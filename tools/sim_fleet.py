"""Fleet simulation: N real daemon processes (`edgectl serve`, each with its own store, outbox and MQTT
connection) against one local Mosquitto, for growing N until one does not hold.

For each N: start the N daemons side by side and wait for each one's READY=1; then measure
1. presence: how many the fleet view (`edgectl devices`'s code) shows online, and how long it took;
2. telemetry ingest: messages/s one subscriber to ``edge/+/telemetry`` receives over ``--measure-s``
   (the expected rate is N / ``--telemetry-s``), and the daemons' CPU (% of one core each) meanwhile;
3. RSS per daemon (VmRSS from /proc), mean and max;
4. a staged rollout of mlp 2 to all of them (`edgectl rollout`'s code: canary 1, then waves of
   ``--wave-size`` with ``--max-parallel`` transfers): the time, and how many committed.
N "holds" when all N are online, the ingest is >= 90% of the expected rate and every device committed.
The load average (``uptime``) is printed beside each row: the machine may be shared.

    python tools/sim_fleet.py [--n 4,8,16,32] [--telemetry-s 1] [--measure-s 10] [--max-parallel 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.artifact import signing  # noqa: E402
from edge_runtime.artifact.bundle import write_bundle  # noqa: E402
from edge_runtime.artifact.manifest import Manifest  # noqa: E402
from edge_runtime.client.broker import Broker  # noqa: E402
from edge_runtime.config.profiles import load_profile  # noqa: E402
from edge_runtime.core.types import TensorSpec  # noqa: E402
from edge_runtime.fleet.devices import fleet_snapshot  # noqa: E402
from edge_runtime.fleet.rollout import Rollout, RolloutOptions  # noqa: E402
from edge_runtime.state.store import ModelStore  # noqa: E402
from tools.bench_common import PROFILE, mlp_onnx, start_mosquitto  # noqa: E402

SIZES = (64, 128, 10)


def _bundle(directory: Path, version: str, seed: int, key: signing.PrivateKey) -> Path:
    manifest = Manifest(
        name="mlp", version=version, profile=PROFILE, engine="onnxruntime", model_file="model.onnx",
        inputs=(TensorSpec("input", "float32", ("N", SIZES[0])),),
        outputs=(TensorSpec("probabilities", "float32", ("N", SIZES[2])),),
        files={}, report={"profile": load_profile(PROFILE).to_dict()},
    )  # fmt: skip
    path = directory / f"mlp-{version}.edgebundle"
    write_bundle(path, manifest, {"model.onnx": mlp_onnx(SIZES, seed)}, key)
    return path


def _device(root: Path, index: int, port: int, public: Path, v1: Path, telemetry_s: float) -> Path:
    """A device folder (store with mlp 1, config); the config path."""
    device = f"sim-{index:03d}"
    folder = root / device
    store = ModelStore(folder / "store", signing.load_public_key(public), load_profile(PROFILE))
    store.install(v1)
    store.activate("mlp", "1")
    config = folder / "edge.toml"
    config.write_text(
        f'device_id = "{device}"\nprofile = "{PROFILE}"\nstore = "{folder / "store"}"\npublic_key = "{public}"\n'
        f'groups = ["sim"]\n[http]\nport = 0\n[mqtt]\nport = {port}\nkeepalive = 10\n'
        f'[telemetry]\ninterval_s = {telemetry_s}\n[outbox]\npath = "{folder / "outbox.sqlite"}"\n'
    )
    return config


def _start(configs: list[Path], root: Path) -> list[subprocess.Popen]:
    """Start every daemon side by side, then wait for each one's READY=1 (systemd notify)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    waits = []
    processes = []
    for index, config in enumerate(configs):
        path = root / f"notify-{index}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(path))
        notify.settimeout(600)
        log = open(config.parent / "daemon.log", "wb")  # noqa: SIM115 (closed below)
        processes.append(subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config",
                                           str(config)], env={**env, "NOTIFY_SOCKET": str(path)},
                                          stdout=log, stderr=log))  # fmt: skip
        log.close()
        waits.append(notify)
    for notify in waits:
        try:
            while "READY=1" not in notify.recv(4096).decode():
                pass
        finally:
            notify.close()
    return processes


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ingest(broker: Broker, seconds: float) -> float:
    """Telemetry messages/s one subscriber receives."""
    link = broker.link("sim-ingest", queue_size=1 << 16)
    count = [0]
    lock = threading.Lock()

    def on_message(_message: object) -> None:
        with lock:
            count[0] += 1

    link.subscribe("edge/+/telemetry", on_message, qos=1)
    link.start()
    try:
        link.wait_connected(10)
        time.sleep(1.0)  # settle
        with lock:
            start = count[0]
        time.sleep(seconds)
        with lock:
            return (count[0] - start) / seconds
    finally:
        link.stop(1.0)


def _presence(broker: Broker, n: int) -> tuple[int, float]:
    """(devices online in the fleet view, seconds from subscribing until all n showed)."""
    started = time.monotonic()
    for wait in (0.5, 1.0, 2.0, 4.0):
        view = fleet_snapshot(broker, wait_s=wait)
        online = sum(row.online is True for row in view.rows())
        if online >= n:
            break
    return online, time.monotonic() - started


def run(n: int, args: argparse.Namespace) -> dict[str, object]:
    """Start N daemons, measure, roll out, stop; one row."""
    with tempfile.TemporaryDirectory(prefix="sim-fleet-") as tmp:
        root = Path(tmp)
        mosquitto, port = start_mosquitto(root)
        processes: list[subprocess.Popen] = []
        try:
            private, public = signing.generate_keypair(root, "sim")
            key = signing.load_private_key(private)
            v1, v2 = _bundle(root, "1", 1, key), _bundle(root, "2", 2, key)
            configs = [_device(root, i, port, public, v1, args.telemetry_s) for i in range(n)]
            started = time.monotonic()
            processes = _start(configs, root)
            start_s = time.monotonic() - started
            broker = Broker("127.0.0.1", port)
            online, presence_s = _presence(broker, n)
            cpu_before = sum(_cpu_s(p.pid) for p in processes)
            rate = _ingest(broker, args.measure_s)
            cpu = (sum(_cpu_s(p.pid) for p in processes) - cpu_before) / (args.measure_s + 1.0) / n * 100
            rss = [_rss_mb(p.pid) for p in processes]
            options = RolloutOptions(canary=1, wave_size=args.wave_size, max_parallel=args.max_parallel,
                                     max_failures=n, timeout=600.0)  # fmt: skip
            rolled = time.monotonic()
            summary = Rollout(broker, v2.read_bytes(), [f"sim-{i:03d}" for i in range(n)], root / "rollout.json",
                              options).run()  # fmt: skip
            rollout_s = time.monotonic() - rolled
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            mosquitto.terminate()
            mosquitto.wait(10)
    expected = n / args.telemetry_s
    committed = summary.counts.get("committed", 0)
    holds = online == n and rate >= 0.9 * expected and committed == n
    return {"n": n, "start_s": start_s, "online": online, "presence_s": presence_s, "rate": rate,
            "expected": expected, "cpu": cpu, "rss_mean": sum(rss) / n, "rss_max": max(rss),
            "rollout_s": rollout_s, "committed": committed, "holds": holds,
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}  # fmt: skip


HEADER = ("N", "start s", "online", "view s", "telemetry msg/s (expected)", "CPU %/daemon", "RSS MB mean/max",
          "rollout s", "committed", "holds", "load 1/5/15")  # fmt: skip


def _row(r: dict[str, object]) -> tuple[str, ...]:
    return (str(r["n"]), f"{r['start_s']:.1f}", f"{r['online']}/{r['n']}", f"{r['presence_s']:.1f}",
            f"{r['rate']:.1f} ({r['expected']:.1f})", f"{r['cpu']:.1f}", f"{r['rss_mean']:.0f}/{r['rss_max']:.0f}",
            f"{r['rollout_s']:.1f}", f"{r['committed']}/{r['n']}", "yes" if r["holds"] else "NO", str(r["load"]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", default="4,8,16,32", help="Fleet sizes to try, in order (stops at the first that fails)."
    )
    parser.add_argument("--telemetry-s", type=float, default=1.0, help="Telemetry interval of every daemon.")
    parser.add_argument("--measure-s", type=float, default=10.0, help="Seconds of telemetry ingest measured.")
    parser.add_argument("--wave-size", type=int, default=1000, help="Rollout wave size after the canary.")
    parser.add_argument("--max-parallel", type=int, default=8, help="Rollout transfers at once.")
    args = parser.parse_args()
    print(f"$ python tools/sim_fleet.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    largest = 0
    for n in (int(x) for x in args.n.split(",")):
        result = run(n, args)
        print("| " + " | ".join(_row(result)) + " |", flush=True)
        if not result["holds"]:
            break
        largest = n
    print(f"largest N that held: {largest}")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
