"""The store against odd state files, odd names and concurrent writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.core.errors import BundleError, UsageError
from edge_runtime.state.store import ModelState, ModelStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path, signing_keys, device_profile) -> ModelStore:
    return ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"v": 1, "active": 123}', "'active' must be a version name or null, not 'int'"),
        (b'{"v": 1, "active": ["1"]}', "not 'list'"),
        (b'{"v": 1, "active": "1", "previous": true}', "'previous' must be"),
        (b'{"v": 1, "active": "../../etc"}', "not '../../etc'"),
        (b'{"v": 1, "active": "1\\n"}', "must be a version name"),
        (b'{"v": true, "active": "1"}', "not a v1 state file"),
        (b'{"v": 2, "active": "1"}', "not a v1 state file"),
        (b'{"v": 1, "active": "1", "trial": "2"}', "unknown field 'trial'"),
        (b'["1"]', "must hold a JSON object"),
        (b"[" * 50_000, "deeper than 64"),
        (b"{not json", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b" " * 70_000, "larger than"),
    ],
)
def test_odd_state_files_are_refused_with_the_file_named(store, mlp_bundle_factory, raw, message):
    store.install(mlp_bundle_factory("mlp", "1"))
    state_file = store.root / "mlp" / "state.json"
    state_file.write_bytes(raw)
    with pytest.raises(BundleError, match=message) as refused:
        store.state("mlp")
    assert str(state_file) in str(refused.value)
    with pytest.raises(BundleError, match=message):
        store.rollback("mlp")
    assert store.active() == {}


def test_state_round_trip_and_null_previous():
    from edge_runtime.state.store import parse_state

    state = ModelState(active="2", previous="1")
    assert parse_state(state.to_json(), "x") == state
    assert parse_state(b'{"v": 1, "active": null, "previous": null}', "x") == ModelState(None, None)


def test_names_must_fully_match(store):
    for bad in ("1\n", "mlp\n", "../x", "a/b", ".hidden", "", "x" * 129):
        with pytest.raises(BundleError, match="cannot be stored"):
            store.bundle_path("mlp" if bad != "mlp\n" else bad, bad if bad != "mlp\n" else "1")
    (store.root / "odd\n").mkdir()
    (store.root / ".hidden").mkdir()
    (store.root / "ok").mkdir()
    assert store.models() == ["ok"]


def test_symlinked_model_folder_is_not_followed(store, tmp_path, mlp_bundle_factory):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (store.root / "mlp").symlink_to(elsewhere)
    assert store.models() == []
    with pytest.raises(BundleError, match="symbolic link"):
        store.install(mlp_bundle_factory("mlp", "1"))
    (store.root / ".staging").rmdir()
    (store.root / ".staging").symlink_to(elsewhere)
    (store.root / ".lock").symlink_to(elsewhere / "lock")
    with pytest.raises(BundleError, match="symbolic link"):
        store.install(mlp_bundle_factory("other", "1"))
    with pytest.raises(UsageError, match="cannot lock"):
        store.activate("mlp", "1")
    assert list(elsewhere.iterdir()) == []


def test_missing_store_is_refused_unless_created(tmp_path, signing_keys, device_profile):
    missing = tmp_path / "not-mounted" / "store"
    with pytest.raises(UsageError, match=r"does not exist .*mounted"):
        ModelStore(missing, signing_keys.public_key, device_profile, create=False)
    assert not missing.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        ModelStore(tmp_path / "file", signing_keys.public_key, device_profile, create=False)
    assert ModelStore(missing, None, None, create=True).root.is_dir()


def test_install_leaves_no_staged_copy_on_refusal(store, mlp_bundle_factory, tmp_path):
    path = mlp_bundle_factory("mlp", "1")
    truncated = tmp_path / "t.edgebundle"
    truncated.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(BundleError):
        store.install(truncated)
    assert list((store.root / ".staging").iterdir()) == []
    store.install(path)
    assert list((store.root / ".staging").iterdir()) == []


def test_remove_refuses_versions_in_use(store, mlp_bundle_factory):
    for version in ("1", "2", "3"):
        store.install(mlp_bundle_factory("mlp", version))
    store.activate("mlp", "1")
    store.activate("mlp", "2")
    for in_use in ("1", "2"):
        with pytest.raises(UsageError, match="in use"):
            store.remove("mlp", in_use)
    store.remove("mlp", "3")
    assert store.versions("mlp") == ["1", "2"]


def test_lock_is_reentrant_and_excludes_other_holders(store):
    with store.lock(), store.lock():  # a writer holding it may call another writer
        other = ModelStore(store.root, None, None, lock_timeout_s=0.2)
        other_process = subprocess.run(
            [sys.executable, "-c", WRITER, str(store.root), "0", "1", "0.2"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other_process.returncode == 3 and "held by another writer" in other_process.stdout
        import threading

        outcome: list[str] = []

        def in_thread() -> None:
            try:
                with other.lock():
                    outcome.append("held")
            except Exception as exc:
                outcome.append(type(exc).__name__)

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        assert outcome == ["TransientError"]
    with ModelStore(store.root, None, None, lock_timeout_s=0.2).lock():
        pass


WRITER = r"""
import sys
from pathlib import Path
from edge_runtime.core.errors import TransientError
from edge_runtime.state.store import ModelState, ModelStore
root, writer, rounds, timeout = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
store = ModelStore(root, None, None, create=False, lock_timeout_s=timeout)
try:
    for i in range(rounds):
        # read-modify-write: only safe when the whole step holds the lock
        with store.lock():
            counts = json.loads((root / "counts.json").read_text()) if (root / "counts.json").exists() else {}
            counts[writer] = counts.get(writer, 0) + 1
            (root / "counts.json").write_text(json.dumps(counts))
            state = store.state("mlp")
            store.write_state("mlp", ModelState(active=f"{writer}-{i}", previous=state.active))
except TransientError as exc:
    print(exc)
    sys.exit(3)
""".replace("import sys", "import json, sys", 1)


def test_two_processes_writing_state_concurrently_end_consistent(store, mlp_bundle_factory):
    (store.root / "mlp").mkdir()
    rounds = 200
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(store.root), name, str(rounds), "60"], env=env)
        for name in ("a", "b")
    ]
    assert [w.wait(120) for w in writers] == [0, 0]
    # Every read-modify-write under the lock counted: no lost update, and state.json parses.
    assert json.loads((store.root / "counts.json").read_text()) == {"a": rounds, "b": rounds}
    final = store.state("mlp")
    assert final.active in (f"a-{rounds - 1}", f"b-{rounds - 1}")
    assert final.previous is not None and final.previous != final.active
    assert not list((store.root / "mlp").glob(".*tmp"))


@settings(max_examples=300, deadline=None)
@given(
    doc=st.dictionaries(
        st.sampled_from(["v", "active", "previous", "other"]),
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=12)
        | st.lists(st.integers(), max_size=2),
    ),
    raw=st.binary(max_size=128),
)
def test_fuzzed_state_files_parse_typed_or_are_bundle_errors(doc, raw):
    from edge_runtime.state.store import parse_state

    for candidate in (json.dumps(doc).encode(), raw):
        try:
            state = parse_state(candidate, "state.json")
        except BundleError:
            continue
        for version in (state.active, state.previous):
            assert version is None or (
                isinstance(version, str) and "/" not in version and version.strip() == version
            )


def test_a_download_in_staging_is_moved_in_and_a_refused_one_removed(store, mlp_bundle_factory, tmp_path):
    good = store.staging_dir() / "download.edgebundle"
    good.write_bytes(mlp_bundle_factory("mlp", "1").read_bytes())
    store.install(good)
    assert not good.exists() and store.versions("mlp") == ["1"]
    bad = store.staging_dir() / "bad.edgebundle"
    bad.write_bytes(b"PK\x05\x06" + bytes(18))
    with pytest.raises(BundleError):
        store.install(bad)
    assert list(store.staging_dir().iterdir()) == []


def test_store_files_are_readable_by_the_daemons_user(store, mlp_bundle_factory):
    store.install(mlp_bundle_factory("mlp", "1"))
    store.activate("mlp", "1")
    for path in (store.bundle_path("mlp", "1"), store.root / "mlp" / "state.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
