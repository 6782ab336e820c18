"""The package as a device gets it: build the wheel, install it into a clean venv with the device
dependencies only, and prove it works there.

    python tools/ci_wheel_check.py [--workdir DIR] [--keep]

Checks, in the venv (no onnx, no torch, no compressor extras): `edgectl --help` lists the commands
without importing the compressor; a built-in profile resolves (`edgectl profiles x86-vnni-gateway`);
`edgectl serve --config ...` serves a bundle built here in the workstation env from a store, and one
HTTP inference request is answered with the expected output. Exit 0 when all pass; every process
started here is stopped before exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(ROOT))

MODEL, VERSION = "mlp", "1"
PACKAGES = ("edge_runtime", "compressor")
DEVICE_DEPENDENCIES = ("numpy", "onnxruntime", "paho.mqtt", "click", "cryptography")
MUST_BE_ABSENT = ("onnx", "torch", "sklearn", "tensorflow", "matplotlib")
HELP_PROBE = """
import contextlib, io, json, sys
from edge_runtime.cli import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        cli(["--help"], prog_name="edgectl")
    except SystemExit as exc:
        code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"compressor", "onnx", "torch", "sklearn"})
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": heavy}))
"""


class CheckFailed(Exception):
    """One of the wheel checks did not hold."""


def run(command: Sequence[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command outside the repo (so nothing is imported from the work tree); fail with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=env,
        **kwargs,  # type: ignore[call-overload]
    )
    if done.returncode != 0:
        raise CheckFailed(
            f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done


def source_files() -> list[str]:
    """The repo's files as git sees them (tracked and new, never ignored ones such as build/)."""
    listed = run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    return sorted(name for name in listed.split("\0") if name and (ROOT / name).is_file())


def build_wheel(out: Path) -> Path:
    """`pip wheel --no-deps` of a clean copy of the repo (no stale build/) into `out`; the wheel's path."""
    files = source_files()
    copy = out / "source"
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name, follow_symlinks=False)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, copy], cwd=out)
    wheels = sorted(out.glob("edge_runtime-*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"expected one edge_runtime wheel in {out}, found {[w.name for w in wheels]}")
    with zipfile.ZipFile(wheels[0]) as archive:
        shipped = set(archive.namelist())
    wanted = {n for n in files if n.split("/")[0] in PACKAGES and n.endswith((".py", ".toml", ".typed"))}
    missing = sorted(wanted - shipped)
    if missing:
        raise CheckFailed(f"the wheel lacks {len(missing)} package files, e.g. {missing[:5]}")
    stray = sorted(
        {n.split("/")[0] for n in shipped}
        - set(PACKAGES)
        - {n.split("/")[0] for n in shipped if ".dist-info" in n}
    )
    if stray:
        raise CheckFailed(f"the wheel ships top-level {stray}, which are not packages of ours")
    return wheels[0]


def make_device_venv(folder: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel and its declared (device) dependencies; its bin folder."""
    run([sys.executable, "-m", "venv", folder], cwd=folder.parent)
    bin_dir = folder / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], cwd=folder)
    probe = (
        "import importlib.util, json, edge_runtime; "
        f"print(json.dumps({{'file': edge_runtime.__file__, "
        f"'present': [m for m in {list(MUST_BE_ABSENT)!r} if importlib.util.find_spec(m)], "
        f"'missing': [m for m in {list(DEVICE_DEPENDENCIES)!r} if importlib.util.find_spec(m) is None]}}))"
    )
    found = json.loads(run([bin_dir / "python", "-c", probe], cwd=folder).stdout)
    if not found["file"].startswith(str(folder)):
        raise CheckFailed(f"edge_runtime imported from {found['file']}, not from the venv")
    if found["present"] or found["missing"]:
        raise CheckFailed(f"venv has {found['present']} (must not) and lacks {found['missing']} (must have)")
    return bin_dir


def check_help(bin_dir: Path, cwd: Path) -> None:
    """`edgectl --help` lists every command and imports neither the compressor nor onnx."""
    listing = run([bin_dir / "edgectl", "--help"], cwd=cwd).stdout
    from edge_runtime.cli import COMMANDS

    for name, (_, short_help) in COMMANDS.items():
        if not any(line.split() == [name, *short_help.split()] for line in listing.splitlines()):
            raise CheckFailed(f"edgectl --help does not list '{name}: {short_help}':\n{listing}")
    probe = json.loads(run([bin_dir / "python", "-c", HELP_PROBE], cwd=cwd).stdout)
    if probe["code"] != 0 or probe["heavy"]:
        raise CheckFailed(f"edgectl --help exited {probe['code']} and imported {probe['heavy']}")


def check_profile(bin_dir: Path, cwd: Path) -> None:
    """A built-in profile resolves from the installed package (not a namespace-package path)."""
    shown = run([bin_dir / "edgectl", "profiles", "x86-vnni-gateway"], cwd=cwd).stdout
    if "x86-vnni-gateway" not in shown:
        raise CheckFailed(f"edgectl profiles x86-vnni-gateway printed:\n{shown}")


def make_bundle(folder: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A signed MLP bundle built in this (workstation) env: its path, the public key's path, one input
    and the output the model must give for it."""
    from edge_runtime.artifact import signing
    from edge_runtime.artifact.bundle import write_bundle
    from edge_runtime.artifact.golden import GoldenCase, pack_golden
    from edge_runtime.artifact.manifest import GoldenSpec, Manifest
    from edge_runtime.config.profiles import load_profile
    from edge_runtime.core.types import TensorSpec
    from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, build_onnx_mlp, make_weights, reference_forward

    private_path, public_path = signing.generate_keypair(folder, "signing")
    weights = make_weights(64, 32, 10, seed=7)
    x = np.random.default_rng(7).normal(size=(2, 64)).astype(np.float32)
    golden = [GoldenCase({INPUT_NAME: x}, {OUTPUT_NAME: reference_forward(weights, x)})]
    manifest = Manifest(
        name=MODEL,
        version=VERSION,
        profile="x86-vnni-gateway",
        engine="onnxruntime",
        model_file="model.onnx",
        inputs=(TensorSpec(INPUT_NAME, "float32", ("N", 64)),),
        outputs=(TensorSpec(OUTPUT_NAME, "float32", ("N", 10)),),
        files={},
        golden=GoldenSpec(file="golden.npz", cases=1, rtol=1e-4, atol=1e-4),
        session_config={},
        report={"profile": load_profile("x86-vnni-gateway").to_dict()},
    )
    bundle = folder / f"{MODEL}.edgebundle"
    members = {"model.onnx": build_onnx_mlp(weights), "golden.npz": pack_golden(golden)}
    write_bundle(bundle, manifest, members, signing.load_private_key(private_path))
    return bundle, public_path, x, reference_forward(weights, x)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http(url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request; (status, body), errors included."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(base: str, daemon: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    """Poll /v2/health/ready until 200; fail with the daemon's log if it exits or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise CheckFailed(f"edgectl serve exited {daemon.returncode}:\n{log.read_text()}")
        try:
            if http(f"{base}/v2/health/ready", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise CheckFailed(f"edgectl serve not ready after {timeout:.0f} s:\n{log.read_text()}")


def check_serve(bin_dir: Path, folder: Path) -> None:
    """`edgectl store install` then `edgectl serve --config`, from the venv, answer one v2 request right."""
    bundle, public_key, x, expected = make_bundle(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = [str(bin_dir / "edgectl"), "store", "install", str(bundle), "--store", str(folder / "store"),
               "--key", str(public_key), "--create", "--activate"]  # fmt: skip
    done = subprocess.run(install, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise CheckFailed(f"edgectl store install exited {done.returncode}: {done.stderr.strip()}")
    port = free_port()
    config = folder / "device.toml"
    config.write_text(
        f'device_id = "wheel-check"\nprofile = "x86-vnni-gateway"\nstore = "store"\n'
        f'public_key = "{public_key.name}"\n\n[http]\nport = {port}\n\n[mqtt]\nenabled = false\n'
    )
    log = folder / "serve.log"
    with log.open("wb") as sink:
        daemon = subprocess.Popen(
            [str(bin_dir / "edgectl"), "serve", "--config", str(config)],
            cwd=folder,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, daemon, log)
        from tests.mlp_models import INPUT_NAME

        tensor = {"name": INPUT_NAME, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        request = {"inputs": [tensor]}
        status, body = http(f"{base}/v2/models/{MODEL}/infer", json.dumps(request).encode())
        if status != 200:
            raise CheckFailed(f"infer answered {status}: {body[:500]!r}")
        output = json.loads(body)["outputs"][0]
        got = np.asarray(output["data"], np.float32).reshape(output["shape"])
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise CheckFailed(f"infer answered {got.tolist()}, expected {expected.tolist()}")
    finally:
        stop(daemon)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s: never leave the daemon running."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check; print one line per check; non-zero exit on the first failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="Work here (default: a fresh temp folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (venv, wheel, logs).")
    args = parser.parse_args(argv)
    folder = (args.workdir or Path(tempfile.mkdtemp(prefix="wheel-check-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        wheel = build_wheel(folder)
        print(f"ok  built {wheel.name}")
        bin_dir = make_device_venv(folder / "venv", wheel)
        print("ok  clean venv with the device dependencies only (no onnx, torch, sklearn, tensorflow)")
        check_help(bin_dir, folder)
        print("ok  edgectl --help lists every command without importing the compressor")
        check_profile(bin_dir, folder)
        print("ok  edgectl profiles x86-vnni-gateway resolves the built-in profile")
        check_serve(bin_dir, folder)
        print("ok  edgectl serve --config answered one v2 inference request correctly")
    except CheckFailed as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
