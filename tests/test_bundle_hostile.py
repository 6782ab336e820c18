"""Hostile bundles: each is refused with a BundleError naming the problem, never a crash.

The manifest's signature is checked over its raw bytes before they are parsed; parsing is strict
and typed (bounded size and nesting); zip members are read in bounded chunks; duplicate and
odd member names are refused.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.artifact import signing
from edge_runtime.artifact.bundle import read_bundle
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.cli import cli
from edge_runtime.core.errors import BundleError, SignatureError

Members = list[tuple[str, bytes]]


def members_of(path: Path) -> Members:
    """A bundle's members, in order."""
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_zip(path: Path, members: Members) -> Path:
    """A zip holding `members` as given (duplicates included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names: that is the point
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                archive.writestr(name, data)
    return path


def replaced(members: Members, **new: bytes | None) -> Members:
    """`members` with some replaced (bytes) or dropped (None); names use '_' for '.'."""
    wanted = {key.replace("_", "."): value for key, value in new.items()}
    out = [(name, wanted.get(name, data)) for name, data in members if wanted.get(name, data) is not None]
    return out


def resigned(members: Members, manifest: bytes, key: signing.PrivateKey) -> Members:
    """`members` with `manifest` and its real signature by `key` (a trusted signer's odd manifest)."""
    return replaced(members, manifest_json=manifest, manifest_sig=signing.sign(key, manifest))


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_unsigned_manifests_are_refused_before_they_are_parsed(mlp_bundle_factory, signing_keys, tmp_path):
    members = members_of(mlp_bundle_factory())
    manifest = json.loads(dict(members)["manifest.json"])
    odd = {
        "report-ab": json.dumps({**manifest, "report": "ab"}).encode(),
        "nested-50k": ('{"v": 1, "report": {"x": ' + deep(50_000) + "}}").encode(),
        "nested-50k-bare": deep(50_000).encode(),
        "not-json": b"\xff\xfe{",
    }
    for label, raw in odd.items():
        for signature in (None, b"\x00" * 64):  # no signature, or one that does not verify
            bad = write_zip(tmp_path / f"{label}.edgebundle", replaced(members, manifest_json=raw,
                                                                        manifest_sig=signature))  # fmt: skip
            with pytest.raises(SignatureError, match=r"unsigned|does not verify"):
                read_bundle(bad, signing_keys.public_key)
            from edge_runtime.artifact.bundle import read_manifest

            with pytest.raises(SignatureError):
                read_manifest(bad, signing_keys.public_key)
        # read without a key (inspect), the strict parser refuses each with a reason
        with pytest.raises(BundleError, match=r"report must be an object|deeper than 64|not valid JSON"):
            read_bundle(bad, None)


def _mutations(manifest: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Label -> (a signed manifest document, the message expected)."""
    spec = manifest["inputs"][0]
    entry = manifest["files"]["model.onnx"]
    return {
        "report str": ({**manifest, "report": "ab"}, "report must be an object"),
        "report nested 50k": ({**manifest, "report": {"x": json.loads(deep(70))}}, "deeper than 64"),
        "inputs str": ({**manifest, "inputs": "pixels"}, "inputs must be a list"),
        "input not object": ({**manifest, "inputs": [1]}, r"inputs\[0\]\. must be an object"),
        "shape bool": ({**manifest, "inputs": [{**spec, "shape": [True, 64]}]}, "shape holds True"),
        "shape float": ({**manifest, "inputs": [{**spec, "shape": [1.5]}]}, "shape holds 1.5"),
        "size str": ({**manifest, "files": {**manifest["files"], "model.onnx": {**entry, "size": "9"}}},
                     "size must be a non-negative integer"),
        "size negative": ({**manifest, "files": {**manifest["files"], "model.onnx": {**entry, "size": -1}}},
                          "non-negative"),
        "sha256 short": ({**manifest, "files": {**manifest["files"], "model.onnx": {**entry, "sha256": "ab"}}},
                         "64 lowercase hex"),
        "files list": ({**manifest, "files": []}, "files must be an object"),
        "member escapes": ({**manifest, "files": {**manifest["files"], "../x": entry}}, "not a safe member"),
        "name newline": ({**manifest, "name": "mlp\n"}, "name 'mlp\n' is not a safe name"),
        "version path": ({**manifest, "version": "../../etc"}, "version '../../etc' is not a safe name"),
        "v bool": ({**manifest, "v": True}, "schema vTrue is not supported"),
        "v missing": ({k: v for k, v in manifest.items() if k != "v"}, "schema vNone"),
        "unknown field": ({**manifest, "extra": 1}, "unknown field 'extra'"),
        "golden str": ({**manifest, "golden": "golden.npz"}, "golden. must be an object"),
        "golden rtol str": ({**manifest, "golden": {**manifest["golden"], "rtol": "1"}}, "rtol must be"),
        "report nan": ({**manifest, "report": math.nan}, "report must be an object, not float"),
        "golden atol nan": ({**manifest, "golden": {**manifest["golden"], "atol": math.nan}}, "atol must be a finite"),
        "session_config int": ({**manifest, "session_config": {"a": 1}}, "session_config value must be a string"),
        "model_file unlisted": ({**manifest, "model_file": "other.onnx"}, "files list does not hold"),
        "top-level list": ([manifest], "must hold a JSON object"),
    }  # fmt: skip


def test_signed_but_odd_manifests_are_bundle_errors(mlp_bundle_factory, signing_keys, tmp_path):
    members = members_of(mlp_bundle_factory())
    manifest = json.loads(dict(members)["manifest.json"])
    for index, (label, (document, message)) in enumerate(_mutations(manifest).items()):
        raw = json.dumps(document).encode()
        path = write_zip(
            tmp_path / f"odd{index}.edgebundle", resigned(members, raw, signing_keys.private_key)
        )
        with pytest.raises(BundleError, match=message) as refused:
            read_bundle(path, signing_keys.public_key)
        assert refused.type in (BundleError,), label
        with pytest.raises(BundleError, match=message):
            Manifest.from_json(raw)
    for raw, message in [
        (b'{"v": 1, "report": NaN}', "name is missing"),
        (b'{"v": 1, "a": ' + deep(100_000).encode() + b"}", "deeper than 64"),
        (b" " * (5 * 1024 * 1024), "larger than"),
        (b'"' + b'\\"' * 1_000_000, "not valid JSON"),  # linear-time depth scan: no backtracking
        (b'{"v": 1, "report": "' + b"[" * 100_000 + b'"}', "name is missing"),  # strings do not nest
    ]:
        with pytest.raises(BundleError, match=message):
            Manifest.from_json(raw)


def test_duplicate_members_are_refused_by_verify_and_the_store(mlp_bundle_factory, signing_keys, tmp_path):
    from edge_runtime.config.profiles import load_profile
    from edge_runtime.state.store import ModelStore

    members = members_of(mlp_bundle_factory())
    model = dict(members)["model.onnx"]
    for label, extra in (("same", model), ("other", model[:-4] + b"\0\0\0\0")):
        for order in ("after", "before"):
            dup = [*members, ("model.onnx", extra)] if order == "after" else [("model.onnx", extra), *members]
            path = write_zip(tmp_path / f"dup-{label}-{order}.edgebundle", dup)
            with pytest.raises(BundleError, match=r"'model\.onnx' appears twice"):
                read_bundle(path, signing_keys.public_key)
            result = CliRunner().invoke(cli, ["verify", str(path), "--key", str(signing_keys.public_path)])
            assert result.exit_code == 1 and "appears twice" in result.output, result.output
            store = ModelStore(tmp_path / "store", signing_keys.public_key, load_profile("x86-vnni-gateway"))
            with pytest.raises(BundleError, match="appears twice"):
                store.install(path)
            assert store.models() == []


def test_member_names_must_fully_match_the_safe_pattern(mlp_bundle_factory, signing_keys, tmp_path):
    members = members_of(mlp_bundle_factory())
    for index, name in enumerate(["model.onnx\n", "../model.onnx", "a/b", ".hidden", "x" * 200, "a b", "é"]):
        path = write_zip(tmp_path / f"name{index}.edgebundle", [*members, (name, b"x")])
        with pytest.raises(BundleError, match="is not allowed in a bundle"):
            read_bundle(path, signing_keys.public_key)


def test_encrypted_flag_and_odd_compression_are_refused(mlp_bundle_factory, signing_keys, tmp_path):
    good = mlp_bundle_factory()
    raw = bytearray(good.read_bytes())
    central = raw.rfind(b"PK\x01\x02")  # the last central directory entry
    flagged = bytearray(raw)
    flagged[central + 8] |= 0x1  # general purpose flag: encrypted
    (tmp_path / "enc.edgebundle").write_bytes(bytes(flagged))
    with pytest.raises(BundleError, match="encrypted"):
        read_bundle(tmp_path / "enc.edgebundle", signing_keys.public_key)
    method = bytearray(raw)
    method[central + 10] = 14  # LZMA: not a bundle compression
    (tmp_path / "lzma.edgebundle").write_bytes(bytes(method))
    with pytest.raises(BundleError, match="compression method 14"):
        read_bundle(tmp_path / "lzma.edgebundle", signing_keys.public_key)


def test_member_longer_than_declared_and_corrupt_deflate(mlp_bundle_factory, signing_keys, tmp_path):
    members = members_of(mlp_bundle_factory())
    longer = write_zip(tmp_path / "longer.edgebundle",
                       replaced(members, model_onnx=dict(members)["model.onnx"] + b"\0" * 10))  # fmt: skip
    with pytest.raises(BundleError, match=r"inflates beyond the .* bytes allowed"):
        read_bundle(longer, signing_keys.public_key)
    raw = bytearray(mlp_bundle_factory().read_bytes())
    at = raw.find(b"PK\x03\x04", raw.find(b"model.onnx") - 40)  # the model's local header
    raw[at + 200 : at + 260] = b"\xff" * 60  # garbage inside the deflate stream
    (tmp_path / "corrupt.edgebundle").write_bytes(bytes(raw))
    with pytest.raises(BundleError):
        read_bundle(tmp_path / "corrupt.edgebundle", signing_keys.public_key)


def test_keyless_read_keeps_nothing_and_says_so(mlp_bundle_factory):
    bundle = read_bundle(mlp_bundle_factory(), None)
    assert bundle.members == {} and bundle.signed_by == ""
    with pytest.raises(BundleError, match="read without a key"):
        _ = bundle.model_bytes


_FIELD_NAMES = {"v", "name", "version", "profile", "engine", "model_file", "inputs", "outputs", "files",
                "golden", "session_config", "engine_options", "report", "created", "signer"}  # fmt: skip


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(_FIELD_NAMES)), value=JSON, raw=st.binary(max_size=256))
def test_fuzzed_manifests_parse_or_are_bundle_errors(genuine_manifest, field, value, raw):
    for candidate in (json.dumps({**genuine_manifest, field: value}).encode(), raw):
        try:
            manifest = Manifest.from_json(candidate)
        except BundleError:
            continue
        assert isinstance(manifest.name, str) and all(
            isinstance(e.size, int) for e in manifest.files.values()
        )


@pytest.fixture
def genuine_manifest(mlp_bundle_factory) -> dict[str, Any]:
    return json.loads(dict(members_of(mlp_bundle_factory()))["manifest.json"])


def test_reports_with_infinite_numbers_still_read(mlp_bundle_factory, signing_keys, device_profile):
    report = {"profile": device_profile.to_dict(), "sqnr_db": math.inf, "latency_ratio": math.nan}
    bundle = read_bundle(mlp_bundle_factory(report=report), signing_keys.public_key)
    read = bundle.manifest.report
    assert read["sqnr_db"] == math.inf and math.isnan(read["latency_ratio"])
