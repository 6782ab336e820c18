"""Replay the HTTP attacks of issue 10 on loopback against real daemons; print case -> outcome.

    PYTHONPATH=. python tools/attack_http.py [--tree DIR] [--json]

Starts `edgectl serve` (MQTT off) from the code tree `--tree` (default: this checkout) on a free
port, serving a signed MLP bundle, and attacks it: pipelining without reading, 20 half-sent 16 MB
bodies, idle and slowloris connections, a 70 KB head in one write, a 15 MB JSON body while
/v2/health/live is timed from another connection, hostile JSON (100k-deep nesting, NaN,
wrong-typed parameters, NaN outputs) on the orjson and the standard-library JSON paths, and a
flood of connections against a second daemon whose open-file limit is set low with
`resource.setrlimit` in the child. Every case is bounded in count and time. For each case the
table gives the outcome, the daemon's peak RSS growth during it, the slowest health check taken
meanwhile from another connection, and whether the daemon still answers afterwards.

Run it against an older tree (``--tree /path/to/old/checkout``) to see the defects it replays; a
tree without the HTTP limits in its settings gets a config with only the port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.bench_common import PROFILE, free_port, make_store  # noqa: E402

SIZES = (64, 32, 10)
HEALTH = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
LIMITS = """max_connections = 256
header_timeout_s = 3.0
body_timeout_s = 2.0
body_min_bytes_per_s = 4194304
idle_timeout_s = 4.0
"""
"""Shorter timeouts than the defaults (10 s, 10 s + n / 256 KiB/s, 60 s), so that a run takes a minute."""
PUBLIC_KEY = "public.pem"
NOFILE = 128
"""The open-file limit of the daemon the connection flood is aimed at."""


@dataclass
class Daemon:
    """One `edgectl serve` child process."""

    process: subprocess.Popen
    port: int
    log: Path

    def rss(self) -> int:
        """Resident set size in bytes (0 once the process is gone)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def health_ms(self, timeout: float = 5.0) -> float | None:
        """Latency of GET /v2/health/live on a fresh connection, None when unanswered."""
        start = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(HEALTH)
                if not sock.recv(65536).startswith(b"HTTP/1.1 200"):
                    return None
        except OSError:
            return None
        return (time.perf_counter() - start) * 1000.0

    def stop(self) -> None:
        """SIGTERM, then kill if it lingers."""
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_daemon(
    workdir: Path,
    name: str,
    tree: Path,
    *,
    limits: bool,
    nofile: int | None = None,
    stdlib_json: bool = False,
) -> Daemon:
    """A daemon serving the store in `workdir` from code tree `tree`."""
    port = free_port()
    config = workdir / f"{name}.toml"
    http = f"[http]\nport = {port}\n" + (LIMITS if limits else "")
    config.write_text(
        f'device_id = "attack-{name}"\nprofile = "{PROFILE}"\nstore = "{workdir / "store"}"\n'
        f'public_key = "{workdir / PUBLIC_KEY}"\n{http}[mqtt]\nenabled = false\n'
        f'[outbox]\npath = "{workdir / (name + ".sqlite")}"\n'
    )
    path = [str(tree)]
    if stdlib_json:  # a module that refuses to import: the daemon runs on the stdlib json path
        blocker = workdir / "no-orjson"
        blocker.mkdir(exist_ok=True)
        (blocker / "orjson.py").write_text('raise ImportError("orjson hidden by attack_http")\n')
        path.insert(0, str(blocker))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env=env,
        cwd=tree,
        preexec_fn=limit,
    )
    daemon = Daemon(process, port, log)
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"daemon {name} exited: {log.read_text()[-2000:]}")
        if daemon.health_ms(timeout=1.0) is not None:
            return daemon
        time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"daemon {name} did not answer within 60 s")


@dataclass
class Watch:
    """Peak RSS growth and slowest health check while a case runs."""

    rss_growth: int = 0
    health_ms: list[float] = field(default_factory=list)
    unanswered: int = 0


@contextmanager
def watching(daemon: Daemon) -> Iterator[Watch]:
    """Sample the daemon's RSS and time a health check every 50 ms until the block ends."""
    watch, stop = Watch(), threading.Event()
    base = daemon.rss()

    def sample() -> None:
        while not stop.is_set():
            watch.rss_growth = max(watch.rss_growth, daemon.rss() - base)
            latency = daemon.health_ms(timeout=3.0)
            if latency is None:
                watch.unanswered += 1
            else:
                watch.health_ms.append(latency)
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join()


def connect(daemon: Daemon, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout)


def first_reply(sock: socket.socket) -> str:
    """The status of the first reply, 'closed' or 'reset', or 'no answer' (socket timeout)."""
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return "no answer"
    except OSError:
        return "reset"
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"


def post(body: bytes, extra: str = "") -> bytes:
    head = f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def exchange(daemon: Daemon, raw: bytes, timeout: float = 60.0) -> tuple[str, bytes]:
    """Send raw bytes on a fresh connection; the status and body of the reply."""
    with connect(daemon, timeout) as sock:
        sock.sendall(raw)
        reader = sock.makefile("rb")
        try:
            status = reader.readline().split(b" ", 2)[1].decode()
        except (IndexError, OSError):
            return "closed", b""
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, reader.read(length)


# --- the cases ------------------------------------------------------------------------------
def case_pipelining(daemon: Daemon) -> str:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.connect(("127.0.0.1", daemon.port))
    sock.settimeout(1.0)
    sent, chunk, blocked = 0, request * 2000, False
    try:
        while sent < 4_000_000:  # 110k requests at most: about 80 MB of replies
            sent += sock.send(chunk)
    except TimeoutError:
        blocked = True
    time.sleep(2.0)  # let the daemon do what it will with what it read
    sock.close()
    what = "then the client's send blocked" if blocked else "all sent"
    return f"{sent // len(request)} requests sent, no reply read; {what}"


def case_half_bodies(daemon: Daemon) -> str:
    sockets = []
    for _ in range(20):
        sock = connect(daemon, timeout=5.0)
        sockets.append(sock)
        with contextlib.suppress(OSError):  # a refused upload may be closed under us
            sock.sendall(post(b" " * 16_000_000)[:8_000_100])  # head + half the body
    outcomes = Counter(wait_all(sockets, 15.0))
    for sock in sockets:
        sock.close()
    return ", ".join(f"{count}x {what}" for what, count in sorted(outcomes.items()))


def wait_all(sockets: list[socket.socket], seconds: float) -> list[str]:
    """The first reply (or close) on each socket, waiting at most `seconds` for all together."""
    selector = selectors.DefaultSelector()
    results: dict[socket.socket, str] = {}
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + seconds
    while len(results) < len(sockets) and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            results[sock] = first_reply(sock)
            selector.unregister(sock)
    selector.close()
    return [results.get(sock, "no answer") for sock in sockets]


def case_idle(daemon: Daemon) -> str:
    with connect(daemon, timeout=20.0) as sock:
        sock.sendall(HEALTH)
        sock.recv(65536)
        start = time.monotonic()
        try:
            closed = sock.recv(65536) == b""
        except TimeoutError:
            closed = False
        except OSError:
            closed = True
    return f"closed by the daemon after {time.monotonic() - start:.1f} s" if closed else "open after 20 s"


def case_slowloris(daemon: Daemon) -> str:
    with connect(daemon) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        sock.settimeout(0.5)
        start = time.monotonic()
        while time.monotonic() - start < 20.0:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "close"
            return f"{status} after {time.monotonic() - start:.1f} s of one header line per 0.5 s"
    return "still open after 20 s"


def case_big_head(daemon: Daemon) -> str:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    status, _ = exchange(daemon, head)
    return f"{status} for a 70 KB head in one write"


def json_body(rows: int) -> bytes:
    x = np.random.default_rng(0).normal(size=(rows, SIZES[0])).astype(np.float32)
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, SIZES[0]], "data": x.tolist()}]}
    return json.dumps(doc).encode()


def big_json(body: bytes) -> Callable[[Daemon], str]:
    """The case of one large JSON request (built beforehand: the client's own json.dumps would
    hold the client's GIL and slow its health pinger, not the daemon)."""
    raw = post(body)

    def case(daemon: Daemon) -> str:
        start = time.perf_counter()
        status, _ = exchange(daemon, raw)
        return f"{status} for {len(body) / 1e6:.1f} MB of JSON in {time.perf_counter() - start:.2f} s"

    return case


def hostile(raw_body: bytes) -> Callable[[Daemon], str]:
    def case(daemon: Daemon) -> str:
        status, body = exchange(daemon, post(raw_body))
        try:
            message = json.loads(body, parse_constant=_refuse).get("error", "")
        except ValueError:
            return f"{status}, body is not valid JSON"
        return f"{status} {message[:58]}"

    return case


def _refuse(name: str) -> None:
    raise ValueError(name)


ROW = "[" + ", ".join(["0.5"] * SIZES[0]) + "]"
TENSOR = '{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": %s}'
DEEP = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
NAN = ('{"inputs": [%s]}' % (TENSOR % ROW.replace("0.5", "NaN", 1))).encode()
PARAMS = (
    '{"inputs": [%s], "outputs": [{"name": "probabilities", "parameters": [1]}]}' % (TENSOR % ROW)
).encode()


def case_nan_output(daemon: Daemon) -> str:
    x = np.full((1, SIZES[0]), np.nan, np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    status, body = exchange(
        daemon, post(head + x.tobytes(), f"Inference-Header-Content-Length: {len(head)}\r\n")
    )
    try:
        data = json.loads(body, parse_constant=_refuse)["outputs"][0]["data"]
    except ValueError:
        return f"{status}, body is not valid JSON ({body[-40:]!r})"
    return f"{status}, valid JSON, outputs {data[:2]}..."


def case_fd_flood(daemon: Daemon, count: int = 400) -> str:
    keep = connect(daemon)
    keep.sendall(HEALTH)
    first_reply(keep)
    log_before = daemon.log.read_bytes()
    flood = []
    for _ in range(count):
        try:
            sock = connect(daemon, timeout=3.0)
            sock.sendall(HEALTH)
            flood.append(sock)
        except OSError:
            break
    outcomes = Counter(wait_all(flood, 10.0))
    keep.setblocking(True)
    keep.sendall(HEALTH)
    kept = first_reply(keep)
    for sock in flood:
        sock.close()
    keep.close()
    time.sleep(1.0)
    log = daemon.log.read_bytes()[len(log_before) :].decode(errors="replace")
    summary = ", ".join(f"{n}x {what}" for what, n in sorted(outcomes.items()))
    lines = sum(1 for line in log.splitlines() if "WARNING" in line or "ERROR" in line)
    return (
        f"{summary}; first conn: {kept}; log: {lines} warn/error lines, {log.count('Traceback')} tracebacks"
    )


# --- the run --------------------------------------------------------------------------------
def run_case(daemon: Daemon, name: str, case: Callable[[Daemon], str]) -> dict:
    with watching(daemon) as watch:
        try:
            outcome = case(daemon)
        except OSError as exc:
            outcome = f"client error: {exc}"
    serving = daemon.health_ms() is not None
    worst = max(watch.health_ms, default=float("nan"))
    return {
        "case": name,
        "outcome": outcome,
        "rss_mb": round(watch.rss_growth / 1e6, 1),
        "health_max_ms": round(worst, 1),
        "health_unanswered": watch.unanswered,
        "serving_after": serving,
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<24} {'RSS +MB':>8} {'health max ms':>13} {'unanswered':>10} {'serving':>7}  outcome")
    for row in rows:
        print(
            f"{row['case']:<24} {row['rss_mb']:>8.1f} {row['health_max_ms']:>13.1f} "
            f"{row['health_unanswered']:>10} {'yes' if row['serving_after'] else 'NO':>7}  {row['outcome']}"
        )


def main() -> None:
    """Parse arguments, run every case, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, default=ROOT, help="code tree to serve from")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    tree = args.tree.resolve()
    limits = "idle_timeout_s" in (tree / "edge_runtime/config/settings.py").read_text()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="attack-http-") as tmp:
        workdir = Path(tmp)
        _, public_key, _ = make_store(workdir, SIZES)
        public_key.rename(workdir / PUBLIC_KEY)
        daemons: list[Daemon] = []
        try:
            main_daemon = start_daemon(workdir, "main", tree, limits=limits)
            daemons.append(main_daemon)
            cases: list[tuple[str, Callable[[Daemon], str]]] = [
                ("pipelining, no reads", case_pipelining),
                ("20 half 16 MB bodies", case_half_bodies),
                ("idle keep-alive", case_idle),
                ("slowloris head", case_slowloris),
                ("70 KB head, one write", case_big_head),
            ]
            for name, case in cases:
                rows.append(run_case(main_daemon, name, case))
            big = json_body(11_500)
            stdlib = start_daemon(workdir, "stdlib", tree, limits=limits, stdlib_json=True)
            daemons.append(stdlib)
            for label, daemon in (("orjson", main_daemon), ("stdlib", stdlib)):
                for name, case in (
                    ("100k-deep nesting", hostile(DEEP)),
                    ("NaN input", hostile(NAN)),
                    ("outputs[].parameters", hostile(PARAMS)),
                    ("NaN output", case_nan_output),
                    ("15 MB JSON body", big_json(big)),
                ):
                    rows.append(run_case(daemon, f"{name} ({label})", case))
            flood = start_daemon(workdir, "nofile", tree, limits=limits, nofile=NOFILE)
            daemons.append(flood)
            rows.append(run_case(flood, f"400 conns, NOFILE={NOFILE}", case_fd_flood))
        finally:
            for daemon in daemons:
                daemon.stop()
    print_table(rows)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
