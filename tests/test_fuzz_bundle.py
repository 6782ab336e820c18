"""Property tests over what a device reads from disk (issue 10, item 13): bundle archives (mutated
bytes, rebuilt zips with odd members, signed manifests with odd content) and `state.json`. Each read
returns a verified object or raises one of our `EdgeError`s, within a memory bound, and writes nothing
anywhere (nor outside the store)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from edge_runtime.artifact import signing
from edge_runtime.artifact.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, read_bundle
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import EdgeError
from edge_runtime.core.files import sha256_hex
from edge_runtime.state.store import ModelState, ModelStore
from tests.conftest import make_keys
from tests.fuzzing import corrupt, json_values, mutate, outcome, scratch_root, tree

BUNDLE_SETTINGS = settings(max_examples=150, deadline=timedelta(seconds=5))
COMPRESSIONS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
MEMBER_NAMES = st.sampled_from(
    [
        "model.onnx",
        "golden.npz",
        MANIFEST_NAME,
        SIGNATURE_NAME,
        "extra.bin",
        "../evil",
        "a/b",
        ".hidden",
        "x\\y",
        "",
    ]
) | st.text(min_size=1, max_size=12)


class Good(dict):
    """The good bundle's parts, with a short repr (hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return "<the good signed MLP bundle>"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One good signed MLP bundle (built by the shared factory), its members and key."""
    folder = tmp_path_factory.mktemp("fuzz-bundle")
    keys = make_keys(folder)
    from edge_runtime.artifact.bundle import write_bundle
    from edge_runtime.artifact.golden import GoldenCase, pack_golden
    from edge_runtime.artifact.manifest import GoldenSpec
    from edge_runtime.core.types import TensorSpec
    from tests.conftest import golden_inputs
    from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, build_onnx_mlp, make_weights, reference_forward

    weights = make_weights(8, 4, 3, seed=0)
    cases = [
        GoldenCase({INPUT_NAME: x}, {OUTPUT_NAME: reference_forward(weights, x)}) for x in golden_inputs(8, 0)
    ]
    members = {"model.onnx": build_onnx_mlp(weights), "golden.npz": pack_golden(cases)}
    manifest = Manifest(
        name="mlp",
        version="1",
        profile="x86-vnni-gateway",
        engine="onnxruntime",
        model_file="model.onnx",
        inputs=(TensorSpec(INPUT_NAME, "float32", ("N", 8)),),
        outputs=(TensorSpec(OUTPUT_NAME, "float32", ("N", 3)),),
        files={},
        golden=GoldenSpec(file="golden.npz", cases=len(cases), rtol=1e-4, atol=1e-4),
        session_config={},
        report={"profile": load_profile("x86-vnni-gateway").to_dict()},
    )
    path = folder / "good.edgebundle"
    final = write_bundle(path, manifest, members, keys.private_key)
    return Good(bytes=path.read_bytes(), members=members, manifest=final, keys=keys)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the per-example folders (hypothesis runs many examples per test function)."""
    folder = scratch_root(tmp_path_factory.mktemp("fuzz-scratch"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def example_folder(scratch: Path) -> Iterator[Path]:
    """A fresh folder for one example, removed afterwards."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    """A zip of (name, data, compression) entries, duplicates and odd names included."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names: they are the point here
        for name, data, compression in entries:
            info = zipfile.ZipInfo(name or "_")
            info.filename = name  # keep an empty or odd name as is
            info.compress_type = compression
            archive.writestr(info, data)
    return buffer.getvalue()


def _read_and_check(raw: bytes, folder: Path, public_key: signing.PublicKey | None) -> Any:
    """Write `raw` as a bundle file, read it, and check the outcome's shape and that nothing was written."""
    path = folder / "fuzz.edgebundle"
    path.write_bytes(raw)
    before = tree(folder)
    result = outcome(lambda: _verified(read_bundle(path, public_key)))
    assert tree(folder) == before, "reading a bundle must not write anything"
    return result


def _verified(bundle: Bundle) -> Bundle:
    """A bundle that read cleanly: its members are exactly the manifest's, and its golden data parses.

    A keyless read (inspect) checks every sha256 while streaming but keeps no member in memory.
    """
    assert isinstance(bundle.manifest, Manifest)
    if not bundle.signed_by:
        assert bundle.members == {}
        return bundle
    assert set(bundle.members) == set(bundle.manifest.files)
    for name, entry in bundle.manifest.files.items():
        assert sha256_hex(bundle.members[name]) == entry.sha256
    for case in bundle.golden_cases():
        assert all(isinstance(a, np.ndarray) for a in [*case.inputs.values(), *case.outputs.values()])
    return bundle


@BUNDLE_SETTINGS
@given(data=st.data(), signed=st.booleans())
def test_mutated_bundle_bytes(
    valid: dict[str, Any], scratch: Path, data: st.DataObject, signed: bool
) -> None:
    raw = mutate(valid["bytes"], data.draw)
    with example_folder(scratch) as folder:
        _read_and_check(raw, folder, valid["keys"].public_key if signed else None)


@BUNDLE_SETTINGS
@given(data=st.data(), signed=st.booleans())
def test_rebuilt_zips_with_odd_members(
    valid: dict[str, Any], scratch: Path, data: st.DataObject, signed: bool
) -> None:
    original = zipfile.ZipFile(io.BytesIO(valid["bytes"]))
    entries = [(i.filename, original.read(i), zipfile.ZIP_DEFLATED) for i in original.infolist()]
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["drop", "duplicate", "replace", "add", "recompress"]))
        index = data.draw(st.integers(0, len(entries) - 1)) if entries else 0
        if action == "drop" and entries:
            entries.pop(index)
        elif action == "duplicate" and entries:
            entries.append(entries[index])
        elif action == "replace" and entries:
            name, _, compression = entries[index]
            entries[index] = (name, data.draw(st.binary(max_size=64)), compression)
        elif action == "add":
            entries.append((data.draw(MEMBER_NAMES), data.draw(st.binary(max_size=64)), zipfile.ZIP_DEFLATED))
        elif entries:
            name, content, _ = entries[index]
            entries[index] = (name, content, data.draw(st.sampled_from(COMPRESSIONS)))
    with example_folder(scratch) as folder:
        _read_and_check(_zip(entries), folder, valid["keys"].public_key if signed else None)


@BUNDLE_SETTINGS
@given(data=st.data(), resign=st.booleans())
def test_manifests_with_odd_content(
    valid: dict[str, Any], scratch: Path, data: st.DataObject, resign: bool
) -> None:
    """A manifest corrupted in place, signed again with the trusted key (so parsing goes past the
    signature) or left with the old signature (so it must be refused before it is parsed)."""
    doc = json.loads(valid["manifest"].to_json())
    text = json.dumps(corrupt(doc, data.draw, at_most=2)).encode()
    if data.draw(st.booleans()):
        text = mutate(text, data.draw)
    original = zipfile.ZipFile(io.BytesIO(valid["bytes"]))
    signature = signing.sign(valid["keys"].private_key, text) if resign else original.read(SIGNATURE_NAME)
    entries = [(MANIFEST_NAME, text, zipfile.ZIP_DEFLATED), (SIGNATURE_NAME, signature, zipfile.ZIP_DEFLATED)]
    entries += [(name, content, zipfile.ZIP_DEFLATED) for name, content in valid["members"].items()]
    with example_folder(scratch) as folder:
        result = _read_and_check(_zip(entries), folder, valid["keys"].public_key)
        if not resign and text != valid["manifest"].to_json():
            assert isinstance(result, EdgeError), "a manifest changed after signing must be refused"


# No shrink phase: each example signs and writes a bundle, and shrinking these failures ran into
# hypothesis' 5-minute shrink cap; the unshrunk examples are already small (a flipped byte, empty data).
@settings(BUNDLE_SETTINGS, max_examples=100, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(golden=st.binary(max_size=256), data=st.data())
def test_signed_bundle_with_odd_golden_data(
    valid: dict[str, Any], scratch: Path, golden: bytes, data: st.DataObject
) -> None:
    """Golden data is parsed on the device too: a signed bundle whose golden.npz is random or mutated."""
    content = golden if data.draw(st.booleans()) else mutate(valid["members"]["golden.npz"], data.draw)
    members = {**valid["members"], "golden.npz": content}
    with example_folder(scratch) as folder:
        from edge_runtime.artifact.bundle import write_bundle

        manifest = Manifest.from_json(valid["manifest"].to_json())
        write_bundle(folder / "signed.edgebundle", manifest, members, valid["keys"].private_key)
        raw = (folder / "signed.edgebundle").read_bytes()
        (folder / "signed.edgebundle").unlink()
        _read_and_check(raw, folder, valid["keys"].public_key)


state_documents = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(1) | json_values,
        "active": st.sampled_from(["1", "2", "../1", "", "a/b"]) | json_values,
        "previous": st.sampled_from(["1", None]) | json_values,
    },
)


@settings(max_examples=250, deadline=timedelta(seconds=2))
@given(
    raw=st.binary(max_size=128) | state_documents.map(lambda d: json.dumps(d).encode()) | st.just(b"[" * 5000)
)
def test_state_json(valid: dict[str, Any], scratch: Path, raw: bytes) -> None:
    with example_folder(scratch) as folder:
        store_root = folder / "store"
        (store_root / "mlp").mkdir(parents=True)
        (store_root / "mlp" / "state.json").write_bytes(raw)
        store = ModelStore(store_root, valid["keys"].public_key, load_profile("x86-vnni-gateway"))
        before = tree(folder)
        state = outcome(lambda: store.state("mlp"))
        active = outcome(store.active)
        assert tree(folder) == before, "reading the store must not write anything"
        if isinstance(state, ModelState):
            assert state.active is None or isinstance(state.active, str), state
            assert state.previous is None or isinstance(state.previous, str), state
        assert isinstance(active, dict | EdgeError)
        if isinstance(active, dict):
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in active.items()), active
