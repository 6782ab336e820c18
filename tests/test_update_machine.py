"""The install state machine, driven through real handlers over a real store, registry and ONNX bundles.

Crash injection is a table of cases, as in Mender's state_test.cpp: per case the injected failure or
kill, the expected chain of states, and the version that serves at the end. A "kill" drops every
object and boots a new device from the store folder, which then resumes from the journal.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.client.flash import prepare
from edge_runtime.codecs.update_payloads import Compression, Probation, decode_block_request
from edge_runtime.core.errors import BundleError, NotFoundError, UsageError
from edge_runtime.update.journal import Journal
from edge_runtime.update.machine import STATES, TERMINAL, TRANSITIONS, Event, Job, State, run_job
from edge_runtime.update.steps import check_offer
from edge_runtime.update.transfer import BlockReceiver
from tests.conftest import make_keys
from tests.update_harness import (
    NORMAL,
    Device,
    Feeder,
    Killed,
    failed_at,
    handlers,
    hostile_offer,
    rewrite_member,
    rolled_back_at,
    signature_of,
    without_member,
)

RESUMABLE = [state for state in NORMAL if state not in TERMINAL]


@dataclass(frozen=True)
class Case:
    name: str
    chain: list[State]
    serving: str
    fail_in: frozenset[State] = frozenset()
    crash_in: State | None = None
    crash_after: bool = False


CASES = [
    Case("normal_update", NORMAL, "2"),
    *[Case(f"killed_entering_{s.value}", NORMAL, "2", crash_in=s) for s in RESUMABLE],
    *[Case(f"killed_leaving_{s.value}", NORMAL, "2", crash_in=s, crash_after=True) for s in RESUMABLE],
    Case("offered_fails", failed_at(State.OFFERED), "1", fail_in=frozenset({State.OFFERED})),
    Case("download_fails", failed_at(State.DOWNLOADING), "1", fail_in=frozenset({State.DOWNLOADING})),
    Case("verify_fails", failed_at(State.VERIFYING), "1", fail_in=frozenset({State.VERIFYING})),
    Case("install_fails", failed_at(State.INSTALLING), "1", fail_in=frozenset({State.INSTALLING})),
    Case("trial_fails", rolled_back_at(State.TRIAL), "1", fail_in=frozenset({State.TRIAL})),
    Case("commit_fails", rolled_back_at(State.COMMITTING), "1", fail_in=frozenset({State.COMMITTING})),
    Case("probation_fails", rolled_back_at(State.PROBATION), "1", fail_in=frozenset({State.PROBATION})),
    Case(
        "trial_fails_killed_entering_rollback",
        rolled_back_at(State.TRIAL),
        "1",
        fail_in=frozenset({State.TRIAL}),
        crash_in=State.ROLLING_BACK,
    ),
    Case(
        "probation_fails_killed_leaving_rollback",
        rolled_back_at(State.PROBATION),
        "1",
        fail_in=frozenset({State.PROBATION}),
        crash_in=State.ROLLING_BACK,
        crash_after=True,
    ),
    Case(
        "commit_fails_and_rollback_fails",
        [*NORMAL[:6], State.ROLLING_BACK, State.FAILED],
        "1",
        fail_in=frozenset({State.COMMITTING, State.ROLLING_BACK}),
    ),
]


@pytest.fixture
def device_dir(tmp_path, signing_keys, device_profile, mlp_bundle_factory):
    """A store with mlp 1 active and serving; returns (folder, bundle bytes of mlp 2)."""
    root = tmp_path / "store"
    device = Device.boot(root, signing_keys.public_key, device_profile)
    device.store.install(mlp_bundle_factory("mlp", "1", seed=1))
    device.store.activate("mlp", "1")
    return root, mlp_bundle_factory("mlp", "2", seed=2).read_bytes()


def _boot(root: Path, keys, profile) -> Device:
    return Device.boot(root, keys.public_key, profile)


def _run(device: Device, job: Job, feeder: Feeder, **inject) -> State:
    return run_job(job, handlers(device, feeder, **inject), device.journal.save, lambda job: None)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_state_chain_per_injected_failure(case: Case, device_dir, signing_keys, device_profile):
    root, new_bundle = device_dir
    prepared = prepare(new_bundle, block_size=4096, compression="none", job="job1")
    feeder = Feeder(prepared)
    device = _boot(root, signing_keys, device_profile)
    job = Job(prepared.offer)
    try:
        _run(device, job, feeder, fail_in=case.fail_in, crash_in=case.crash_in, crash_after=case.crash_after)
        assert case.crash_in is None, "the injected kill did not happen"
    except Killed:
        del device, job  # everything in memory is gone; the store folder and the journal remain
        device = _boot(root, signing_keys, device_profile)
        assert device.serving() in ("1", "2"), "after a kill the device serves the old or the new version"
        active = device.store.state("mlp").active
        assert device.store.open("mlp", str(active)).manifest.version == active  # never a corrupt one
        (job,) = [j for j in device.journal.load_all() if j.state not in TERMINAL]
        _run(device, job, feeder, fail_in=case.fail_in - {State.TRIAL, State.COMMITTING, State.PROBATION}
             if case.crash_in is State.ROLLING_BACK else case.fail_in)  # fmt: skip
    assert job.history == case.chain
    assert device.serving() == case.serving
    assert device.store.state("mlp").active == case.serving
    reloaded = _boot(root, signing_keys, device_profile)  # what a later restart serves
    assert reloaded.serving() == case.serving
    (saved,) = reloaded.journal.load_all()
    assert saved.state is case.chain[-1] and saved.history == case.chain
    if State.TRIAL in case.fail_in:  # a version that never served is not left behind
        assert reloaded.store.versions("mlp") == ["1"]


def test_a_resumed_download_keeps_what_is_on_disk_and_fetches_only_what_was_lost(
    device_dir, signing_keys, device_profile
):
    root, new_bundle = device_dir
    prepared = prepare(new_bundle, block_size=1024, compression="none", job="job-mid")
    window = 4
    feeder = Feeder(prepared, kill_after=10)  # killed as the 11th block is handed over
    device = _boot(root, signing_keys, device_profile)
    job = Job(prepared.offer)
    original = feeder.download

    feeder.download = lambda dev, window=window: original(dev, window)  # type: ignore[method-assign]
    with pytest.raises(Killed):
        _run(device, job, feeder)
    device = _boot(root, signing_keys, device_profile)
    (job,) = device.journal.load_all()
    assert job.state is State.DOWNLOADING and sorted(feeder.sent) == list(range(10))
    part = device.journal.part_path(job.id)
    data = bytearray(part.read_bytes())
    data[3 * 1024 : 4 * 1024] = bytes(1024)  # a power cut lost block 3 (never synced) ...
    data[5 * 1024 + 7] ^= 0xFF  # ... and left block 5 damaged
    part.write_bytes(bytes(data))
    assert _run(device, job, feeder) is State.COMMITTED
    again = sorted(index for index, count in collections.Counter(feeder.sent).items() if count > 1)
    assert again == [3, 5]  # the other eight blocks written before the kill were kept
    assert sorted(set(feeder.sent)) == list(range(prepared.offer.blocks))
    assert device.serving() == "2"


def test_blocks_in_flight_never_exceed_the_window(device_dir, signing_keys, device_profile):
    """The sliding window: the next blocks are asked for once half the window arrived, never more."""
    root, new_bundle = device_dir
    prepared = prepare(new_bundle, block_size=1024, compression="none", job="job-window")
    device = _boot(root, signing_keys, device_profile)
    job = Job(prepared.offer)
    asked: queue.Queue[list[int]] = queue.Queue()
    outstanding: set[int] = set()
    peak, requests = [0], [0]
    lock = threading.Lock()

    def request(raw: bytes) -> None:
        indices = decode_block_request(raw).indices()
        with lock:
            outstanding.update(indices)
            peak[0], requests[0] = max(peak[0], len(outstanding)), requests[0] + 1
        asked.put(indices)

    receiver = BlockReceiver(job, device.journal.part_path(job.id), request=request,
                             window=8, save_bytes=1 << 20, stall_s=5.0)  # fmt: skip
    runner = threading.Thread(target=receiver.run)
    runner.start()
    served = 0
    while served < prepared.offer.blocks:
        for index in asked.get(timeout=10):
            with lock:
                outstanding.discard(index)
            receiver.receive(index, prepared.blocks[index])
            served += 1
    runner.join(20)
    assert not runner.is_alive()
    assert peak[0] <= 8 and requests[0] >= prepared.offer.blocks // 4  # refilled by half windows
    assert device.journal.part_path(job.id).read_bytes() == new_bundle


def test_zstd_blocks_and_a_delta_install_the_same_bundle(device_dir, signing_keys, device_profile,
                                                        mlp_bundle_factory):  # fmt: skip
    root, _ = device_dir
    new_bundle = mlp_bundle_factory("mlp", "2", seed=1).read_bytes()  # same weights, a new version
    device = _boot(root, signing_keys, device_profile)
    base = device.store.bundle_path("mlp", "1").read_bytes()
    prepared = prepare(new_bundle, block_size=2048, compression="zstd", base=("1", base), job="delta")
    assert prepared.offer.compression is Compression.ZSTD
    assert prepared.offer.delta is not None and prepared.offer.delta.base_version == "1"
    assert prepared.wire_bytes < len(new_bundle)
    check_offer(device.store, prepared.offer, running={})
    job = Job(prepared.offer)
    assert _run(device, job, Feeder(prepared)) is State.COMMITTED
    assert device.store.bundle_path("mlp", "2").read_bytes() == new_bundle


def test_golden_self_test_failure_rolls_back(device_dir, signing_keys, device_profile, mlp_bundle_factory):
    root, _ = device_dir
    wrong = mlp_bundle_factory(
        "mlp", "2", seed=2, golden_outputs=lambda x: np.full((x.shape[0], 10), 0.1, np.float32)
    )
    prepared = prepare(wrong.read_bytes(), block_size=4096, job="golden")
    device = _boot(root, signing_keys, device_profile)
    job = Job(prepared.offer)
    assert _run(device, job, Feeder(prepared)) is State.ROLLED_BACK
    assert job.history == rolled_back_at(State.TRIAL)
    assert "self-test failed" in job.reason
    assert device.serving() == "1" and device.store.versions("mlp") == ["1"]


def _tampered(bundle: bytes) -> bytes:
    """One byte of the model changed, the signed manifest kept: a well-formed zip that lies."""

    def flip(data: bytes) -> bytes:
        raw = bytearray(data)
        raw[len(raw) // 2] ^= 0x55
        return bytes(raw)

    return rewrite_member(bundle, "model.onnx", flip)


@pytest.mark.parametrize("kind", ["tampered", "unsigned", "wrong_key", "wrong_profile"])
def test_refused_bundles_leave_the_running_version(kind, device_dir, signing_keys, device_profile,
                                                   mlp_bundle_factory, tmp_path):  # fmt: skip
    root, good = device_dir
    if kind == "tampered":
        prepared = hostile_offer(_tampered(good), signature=signature_of(good))
    elif kind == "unsigned":
        prepared = hostile_offer(without_member(good, "manifest.sig"))
    elif kind == "wrong_key":
        other = make_keys(tmp_path / "other-keys")
        prepared = prepare(mlp_bundle_factory("mlp", "2", keys=other).read_bytes(), block_size=4096)
    else:
        from edge_runtime.config.profiles import load_profile

        arm = load_profile("raspberry-pi-4")
        prepared = prepare(mlp_bundle_factory("mlp", "2", profile=arm).read_bytes(), block_size=4096)
    device = _boot(root, signing_keys, device_profile)
    job = Job(prepared.offer)
    assert _run(device, job, Feeder(prepared)) is State.FAILED
    assert job.history == failed_at(State.VERIFYING), job.reason
    expected = {
        "tampered": "sha256",
        "unsigned": "unsigned",
        "wrong_key": "signature",
        "wrong_profile": "built for",
    }
    assert expected[kind] in job.reason
    assert device.serving() == "1" and device.store.versions("mlp") == ["1"]


def test_probation_judges_the_new_versions_error_rate(device_dir, signing_keys, device_profile):
    root, new_bundle = device_dir
    rules = Probation(seconds=30.0, max_error_rate=0.1, min_requests=10)
    prepared = prepare(new_bundle, block_size=4096, probation=rules, job="probe")
    stats = {"version": "2", "requests": 20, "errors": 5, "latency_ms": {"p95": 1.0}}
    device = _boot(root, signing_keys, device_profile)
    job = Job(prepared.offer)
    state = run_job(job, handlers(device, Feeder(prepared), model_stats=lambda name: stats),
                    device.journal.save, lambda job: None)  # fmt: skip
    assert state is State.ROLLED_BACK and "error rate 5/20 is over 0.1" in job.reason
    assert device.serving() == "1"


def test_offers_refused_before_anything_is_written(device_dir, signing_keys, device_profile):
    root, new_bundle = device_dir
    device = _boot(root, signing_keys, device_profile)
    offer = prepare(new_bundle, block_size=4096).offer
    from dataclasses import replace

    with pytest.raises(NotFoundError, match="not on this device"):
        check_offer(device.store, replace(offer, model="nosuch"), running={})
    with pytest.raises(UsageError, match="already running"):
        check_offer(device.store, offer, running={"mlp": "other-job"})
    with pytest.raises(BundleError, match="bytes in the model store"):
        check_offer(device.store, replace(offer, size=2**40, payload_size=2**40), running={})
    with pytest.raises(BundleError, match="immutable"):
        check_offer(device.store, replace(offer, version="1"), running={})
    assert list(Journal(root).root.iterdir()) == []


def test_a_mangled_journal_file_is_moved_aside(tmp_path):
    journal = Journal(tmp_path)
    (journal.root / "bad.json").write_text(json.dumps({"offer": {"job": "bad"}, "state": "trial"}))
    (journal.root / "worse.json").write_bytes(b"\x00" * 10)
    assert journal.load_all() == []
    assert sorted(p.name for p in journal.root.iterdir()) == ["bad.bad", "worse.bad"]


def test_the_table_is_complete():
    for state, info in STATES.items():
        if info.terminal:
            assert not any(key[0] is state for key in TRANSITIONS)
        else:
            assert (state, Event.SUCCESS) in TRANSITIONS and (state, Event.FAILURE) in TRANSITIONS
    reachable = {State.OFFERED} | set(TRANSITIONS.values())
    assert reachable == set(State)


def test_a_new_model_is_installed_only_when_the_offer_says_so(device_dir, signing_keys, device_profile,
                                                              mlp_bundle_factory):  # fmt: skip
    root, _ = device_dir
    device = _boot(root, signing_keys, device_profile)
    raw = mlp_bundle_factory("fresh", "1", seed=3).read_bytes()
    with pytest.raises(NotFoundError, match="--new"):
        check_offer(device.store, prepare(raw).offer, running={})
    prepared = prepare(raw, block_size=4096, new_model=True, job="fresh")
    check_offer(device.store, prepared.offer, running={})
    job = Job(prepared.offer)
    assert _run(device, job, Feeder(prepared)) is State.COMMITTED
    assert device.serving("fresh") == "1" and device.serving("mlp") == "1"
    assert job.from_version is None


def test_offering_the_running_version_again_does_nothing(device_dir, signing_keys, device_profile):
    root, _ = device_dir
    device = _boot(root, signing_keys, device_profile)
    prepared = prepare(device.store.bundle_path("mlp", "1").read_bytes(), job="again")
    check_offer(device.store, prepared.offer, running={})
    feeder = Feeder(prepared)
    job = Job(prepared.offer)
    assert _run(device, job, feeder) is State.COMMITTED
    assert job.history == [State.OFFERED, State.COMMITTED] and feeder.sent == []
    assert "already active" in job.reason
