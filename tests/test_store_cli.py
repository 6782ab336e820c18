"""`edgectl store install | list | activate | rollback` through CliRunner and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edge_runtime.cli import cli
from tests.conftest import make_keys

ROOT = Path(__file__).resolve().parent.parent


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_install_list_activate_rollback(tmp_path, signing_keys, mlp_bundle_factory):
    store = tmp_path / "mnt" / "store"  # a device's store folder, mounted here (offline flash)
    key = signing_keys.public_path
    v1, v2 = mlp_bundle_factory("mlp", "1"), mlp_bundle_factory("mlp", "2", seed=2)
    code, out = run("store", "install", v1, "--store", store, "--key", key, "--create", "--activate")
    assert code == 0 and "installed mlp 1" in out and "active: mlp 1 (previous: none)" in out
    assert json.loads((store / "mlp" / "state.json").read_text()) == {"v": 1, "active": "1", "previous": None}
    code, out = run("store", "install", v2, "--store", store, "--key", key, "--profile", "x86-vnni-gateway")
    assert code == 0 and "installed mlp 2" in out and "active" not in out
    code, out = run("store", "list", "--store", store)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split() == ["model", "version", "state", "signer", "size", "created"]
    assert lines[1].split()[:4] == ["mlp", "1", "active", signing_keys_id(signing_keys)]
    assert lines[2].split()[:3] == ["mlp", "2", "-"]
    code, out = run("store", "activate", "mlp", "2", "--store", store, "--key", key)
    assert code == 0 and "active: mlp 2 (previous: 1)" in out and "kill -HUP" in out
    code, out = run("store", "list", "--store", store, "--key", key, "--json")
    rows = {row["version"]: row for row in json.loads(out)}
    assert rows["2"]["state"] == "active" and rows["1"]["state"] == "previous"
    assert rows["1"]["size"] == (store / "mlp" / "1" / "bundle.edgebundle").stat().st_size
    code, out = run("store", "rollback", "mlp", "--store", store)
    assert code == 0 and "active: mlp 1 (previous: 2)" in out
    assert json.loads((store / "mlp" / "state.json").read_text()) == {"v": 1, "active": "1", "previous": "2"}


def signing_keys_id(keys) -> str:
    from edge_runtime.artifact.signing import key_id

    return key_id(keys.public_key)


def test_readable_one_line_errors_and_exit_codes(tmp_path, signing_keys, mlp_bundle_factory):
    store, key = tmp_path / "store", signing_keys.public_path
    bundle = mlp_bundle_factory("mlp", "1")
    other = make_keys(tmp_path / "other")
    broken = tmp_path / "broken.edgebundle"
    broken.write_bytes(bundle.read_bytes()[:-40])
    cases = [
        (["store", "list", "--store", store], 2, "does not exist"),
        (["store", "install", bundle, "--store", store, "--key", key], 2, "--create"),
        (["store", "activate", "mlp", "1", "--store", store], 2, "does not exist"),
        (["store", "rollback", "mlp", "--store", store], 2, "does not exist"),
        (["store", "install", bundle, "--store", store, "--key", tmp_path / "nokey.pub", "--create"], 2,
         "cannot read public key"),
        (["store", "install", bundle, "--store", store, "--key", other.public_path, "--create"], 1,
         "does not verify"),
        (["store", "install", broken, "--store", store, "--key", key, "--create"], 1, "broken.edgebundle"),
        (["store", "install", tmp_path / "none.edgebundle", "--store", store, "--key", key], 2, "no such file"),
        (["store", "install", bundle, "--store", store, "--key", key, "--profile", "raspberry-pi-4",
          "--create"], 1, "arch"),
        (["store", "install", bundle, "--store", store, "--key", key, "--profile", "nosuch"], 1, "nosuch"),
    ]  # fmt: skip
    for args, expected_code, fragment in cases:
        code, out = run(*args)
        assert (code, len(out.strip().splitlines())) == (expected_code, 1), (args, out)
        assert out.startswith("error: ") and fragment in out, (args, out)
    assert not (store / "mlp").exists()
    assert run("store", "install", bundle, "--store", store, "--key", key)[0] == 0  # --create made it
    for args, expected_code, fragment in [
        (["store", "activate", "mlp", "9", "--store", store], 1, "version '9' is not installed"),
        (["store", "activate", "mlp", "1\n", "--store", store], 1, "cannot be stored"),
        (["store", "activate", "../etc", "1", "--store", store], 1, "cannot be stored"),
        (["store", "rollback", "mlp", "--store", store], 1, "no previous version"),
    ]:
        code, out = run(*args)
        assert code == expected_code and fragment in out and len(out.strip().splitlines()) == 1, (args, out)
    (store / "mlp" / "state.json").write_text('{"v": 1, "active": 123}')
    code, out = run("store", "list", "--store", store)
    assert code == 0 and "error" in out and "not 'int'" in out
    code, out = run("store", "rollback", "mlp", "--store", store)
    assert code == 1 and "not 'int'" in out


def test_exit_codes_as_a_subprocess(tmp_path, signing_keys, mlp_bundle_factory):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    store, key, bundle = tmp_path / "store", signing_keys.public_path, mlp_bundle_factory("mlp", "1")

    def edgectl(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    missing = edgectl("store", "list", "--store", store)
    assert missing.returncode == 2 and missing.stderr.startswith("error: model store") and not missing.stdout
    assert (
        edgectl(
            "store", "install", bundle, "--store", store, "--key", key, "--create", "--activate"
        ).returncode
        == 0
    )
    refused = edgectl("store", "rollback", "mlp", "--store", store)
    assert (
        refused.returncode == 1
        and refused.stderr.strip() == "error: model 'mlp' has no previous version to roll back to"
    )
    listed = edgectl("store", "list", "--store", store, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["state"] == "active"
    usage = edgectl("store", "install", bundle)
    assert usage.returncode == 2 and "Missing option '--store'" in usage.stderr
